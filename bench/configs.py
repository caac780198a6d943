"""Parameter counts and forward GMACs of every experiments/ config at full size (meta device, no weights).

python bench/configs.py            # prints a table and writes bench/results/configs.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dip_lightning.core.models import model_summary  # noqa: E402

BASE = REPO / "experiments" / "dip_xl16.yaml"


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            # A new class_path replaces the old init_args (as jsonargparse does when the class changes).
            if "class_path" in value and value["class_path"] != out[key].get("class_path"):
                out[key] = value
            else:
                out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def net_config(*paths: Path) -> dict:
    merged: dict = {}
    for path in paths:
        merged = deep_merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged["model"]["net"]


def build_on_meta(net_cfg: dict) -> torch.nn.Module:
    parser = ArgumentParser()
    parser.add_argument("--net", type=torch.nn.Module)
    cfg = parser.parse_object({"net": net_cfg})
    with torch.device("meta"):
        return parser.instantiate(cfg).net


def main() -> None:
    rows = []
    configs = [(p.name, (p,)) for p in sorted((REPO / "experiments").glob("*.yaml"))]
    configs += [
        (f"ablations/{p.name}", (BASE, p))
        for p in sorted((REPO / "experiments" / "ablations").glob("*.yaml"))
    ]
    for name, paths in configs:
        net = build_on_meta(net_config(*paths))
        s = model_summary(net)
        rows.append(
            f"| {name} | {s['params_total'] / 1e6:.2f} | {s['params_backbone'] / 1e6:.2f} "
            f"| {s['params_head'] / 1e6:.3f} | {s['gmacs_total']:.2f} | {s['gmacs_backbone']:.2f} "
            f"| {s['gmacs_head']:.2f} |"
        )
        print(rows[-1], flush=True)
    header = (
        f"# Parameters and forward GMACs of every experiments/ config\n\n"
        f"`python bench/configs.py`, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, counted on the meta "
        f"device with torch's FlopCounterMode (MACs = FLOPs / 2) at each config's resolution, batch 1. "
        f"Ablations are overlays on dip_xl16.yaml. 'head' is every head module (intermediate ones included); "
        f"the REPA projector is not part of the sampling model and not counted.\n\n"
        f"| config | params (M) | backbone (M) | head (M) | GMACs | backbone GMACs | head GMACs |\n"
        f"| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    out = REPO / "bench" / "results" / "configs.md"
    out.write_text(header + "\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
