"""Activation memory per image of DiP-XL/16 at 256 px and DiP-XL/32 at 512 px, and the per-GPU batch that fits.

    python bench/memory.py --out bench/results/memory.md      # ~10 min on a 2-core CPU
    python bench/memory.py --smoke                            # tiny models: checks the script itself

What is measured: the bytes of the tensors autograd keeps for the backward pass of one training forward
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, parameters excluded), on the CPU, fp32 and
bf16 autocast, without activation checkpointing, with every block checkpointed (``checkpoint_blocks = depth``) and
with the head too (``checkpoint_head``). Each setting is measured at batch 1 and batch 2: the difference is the
memory per image; the rest (bf16 copies of the weights that autocast keeps for the backward) is per step.

What is assumed for the per-GPU batch (printed with the table): the static memory is 20 bytes per trainable
parameter (fp32 weights 4, gradients 4, AdamW moments 8, one EMA 4), plus the frozen DINOv2-B/14 REPA encoder in
fp32 (86.6M parameters; its forward runs without grad, so it keeps no activations) and the REPA projector; the
budget is 90% of 80 GiB (CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation take the rest). The CPU's
attention kernel is assumed to save what the GPU's flash kernel saves (q, k, v, output, log-sum-exp: linear in the
token count); the 256 tokens of both models make the attention matrix small anyway. Transient peaks during the
backward (one block's recomputation under checkpointing, the gradient of the largest activation) are not in it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_lightning.core.models.registry import create_model, model_summary  # noqa: E402

MIB = 2**20
GIB = 2**30
DINOV2_B_PARAMS = 86_580_480  # dinov2_vitb14_pretrain.pth (no registers)
STATIC_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # fp32 weights, gradients, AdamW exp_avg + exp_avg_sq, one EMA
BUDGET_BYTES = 0.9 * 80 * GIB

SETTINGS = {  # name -> DiP keyword arguments (depth filled in per model)
    "none": {},
    "blocks": {"checkpoint_blocks": "all"},
    "blocks+head": {"checkpoint_blocks": "all", "checkpoint_head": True},
}


def saved_bytes(model: torch.nn.Module, batch: int, size: int, dtype: str) -> int:
    """Bytes autograd keeps after one training forward of ``batch`` images (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor

    def keep_inputs(module: torch.nn.Module, inputs: tuple) -> None:
        # A checkpointed call keeps its inputs (Python references held for the recomputation), which the hooks
        # inside torch.utils.checkpoint hide from ours: count them here.
        nonlocal total
        for tensor in inputs:
            if isinstance(tensor, torch.Tensor):
                ptr = tensor.untyped_storage().data_ptr()
                if ptr not in params and ptr not in seen:
                    seen.add(ptr)
                    total += tensor.untyped_storage().nbytes()

    checkpointed = list(model.blocks[: model.checkpoint_blocks])
    if model.checkpoint_head:
        checkpointed.append(model.head)
    handles = [m.register_forward_pre_hook(keep_inputs) for m in checkpointed]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.zeros(batch, dtype=torch.long)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, t, y)
    del out
    for handle in handles:
        handle.remove()
    return total


def measure(name: str, overrides: dict, size: int, dtype: str, per_step: int | None = None) -> dict:
    """Saved bytes per image and per step; with ``per_step`` given, only batch 1 runs (half the memory) and the
    per-step part is taken as given."""
    torch.manual_seed(0)
    with torch.device("meta"):
        depth = create_model(name, **{k: v for k, v in overrides.items() if v != "all"}).depth
    overrides = {k: depth if v == "all" else v for k, v in overrides.items()}
    model = create_model(name, **overrides).train()
    one = saved_bytes(model, 1, size, dtype)
    gc.collect()
    if per_step is not None:
        del model
        gc.collect()
        return {"per_image": one - per_step, "per_step": per_step, "batch1_only": True}
    two = saved_bytes(model, 2, size, dtype)
    del model
    gc.collect()  # two XL models at once do not fit a small machine
    return {"per_image": two - one, "per_step": max(0, 2 * one - two)}


def recompute_peak(kept: dict, setting: str, depth: int) -> int:
    """Bytes per image re-materialised at once in the backward under ``setting``: one block's saved activations
    (``(none - blocks) / depth``) when blocks are checkpointed, the head's (``blocks - blocks+head``) when it is;
    0 without checkpointing or when the rows needed are not measured yet."""
    none, blocks, both = (kept.get(s) for s in ("none", "blocks", "blocks+head"))
    if setting == "none" or none is None or blocks is None:
        return 0
    block = max(0, none["per_image"] - blocks["per_image"]) // depth
    if setting == "blocks":
        return block
    head = max(0, blocks["per_image"] - both["per_image"]) if both is not None else 0
    return max(block, head)


def static_bytes(name: str, size: int) -> tuple[int, int]:
    """(trainable parameters incl. the REPA projector, static bytes) of the model at ``size``."""
    with torch.device("meta"):
        model = create_model(name)
    trainable = sum(p.numel() for p in model.parameters())
    hidden = model.hidden_size
    width = 1152  # the recipes' repa.projector_dim; the MLP is D -> 1152 -> 1152 -> 768 (DINOv2-B features)
    projector = hidden * width + width + width * width + width + width * 768 + 768
    trainable += projector
    return trainable, trainable * STATIC_BYTES_PER_PARAM + DINOV2_B_PARAMS * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--smoke", action="store_true", help="tiny models (checks the script)")
    parser.add_argument(
        "--batch1_only",
        action="store_true",
        help="measure DiP-XL/32 at batch 1 only (for machines that cannot hold batch 2); its per-step part is then "
        "DiP-XL/16's of the same setting plus the larger patch embedding's bf16 copy (marked * in the table)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="JSON of finished measurements: reused, and extended as they finish",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.smoke:
        models = [("DiP-S/16", 64, {"depth": 2}), ("DiP-S/32", 64, {"depth": 2})]
    else:
        models = [("DiP-XL/16", 256, {}), ("DiP-XL/32", 512, {})]
    rows = []
    measured: dict[str, dict] = {}
    started = time.time()
    for name, size, base in models:
        trainable, static = static_bytes(name, size) if not args.smoke else (0, 0)
        with torch.device("meta"):
            summary = model_summary(create_model(name, input_size=size, **base))
        for dtype in ("fp32", "bf16"):
            for setting, extra in SETTINGS.items():
                key = f"{name}@{size} {dtype} {setting}"
                done = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
                if key in done:
                    result = done[key]
                else:
                    per_step = None
                    if args.batch1_only and "/32" in name:
                        ref = done[f"DiP-XL/16@256 {dtype} {setting}"]["per_step"]
                        per_step = ref + (2 * (3072 - 768) * 1152 if dtype == "bf16" else 0)
                    result = measure(name, {"input_size": size, **base, **dict(extra)}, size, dtype, per_step)
                    if args.cache:
                        args.cache.write_text(json.dumps({**done, key: result}, indent=1))
                # Under checkpointing the backward re-materialises one checkpointed call at a time for the whole
                # batch: the largest of them (a block, or the head) is added per image.
                measured[key] = result
                kept = {s: measured.get(f"{name}@{size} {dtype} {s}") for s in SETTINGS}
                transient = recompute_peak(kept, setting, depth=26 if not args.smoke else base["depth"])
                free = BUDGET_BYTES - static - result["per_step"]
                need = result["per_image"] + transient
                batch = int(free // need) if need > 0 else 0
                result = {**result, "recompute_peak": transient}
                rows.append((name, size, dtype, setting, result, batch, trainable, static, summary))
                print(
                    f"{name}@{size} {dtype:4s} {setting:12s} {result['per_image'] / MIB:8.0f} MiB/image "
                    f"{result['per_step'] / MIB:6.0f} MiB/step -> batch {batch} ({time.time() - started:.0f} s)",
                    flush=True,
                )
    if args.out:
        args.out.write_text(render(rows))
        print(f"wrote {args.out}")


def render(rows: list) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        "# Activation memory per image and the per-GPU batch that fits 80 GB",
        "",
        f"Measured {today} on a 2-core CPU ({platform.processor() or platform.machine()}), torch {torch.__version__},"
        f" by `python bench/memory.py {' '.join(sys.argv[1:])}`: bytes autograd keeps for the backward of one",
        "training forward (saved-tensor hooks, parameters excluded), batch 2 minus batch 1. Assumptions in the",
        "script's docstring: static memory 20 B per trainable parameter (fp32 weights, gradients, AdamW, one EMA) +",
        "the frozen DINOv2-B encoder in fp32; budget 90% of 80 GiB; attention saves what a flash kernel saves.",
        "",
    ]
    models = {}
    for name, size, *_rest in rows:
        models.setdefault((name, size), _rest)
    for (name, size), rest in models.items():
        _, _, _, _, trainable, static, summary = rest
        lines.append(
            f"- **{name} @ {size} px**: {summary['params_total']:,} parameters "
            f"(backbone {summary['params_backbone']:,}, head {summary['params_head']:,}), "
            f"{summary['gmacs_total']:.1f} GMACs per image forward (backbone {summary['gmacs_backbone']:.1f}, "
            f"head {summary['gmacs_head']:.1f}); trainable with the REPA projector {trainable:,}; "
            f"static memory {static / GIB:.1f} GiB."
        )
    lines += [
        "",
        "| model | precision | activation checkpointing | saved per image (MiB) | per step (MiB) "
        "| recomputed at once per image (MiB) | per-GPU batch in 80 GB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, size, dtype, setting, result, batch, *_ in rows:
        mark = "*" if result.get("batch1_only") else ""
        lines.append(
            f"| {name} @ {size} | {dtype} | {setting} | {result['per_image'] / MIB:.0f}{mark} | "
            f"{result['per_step'] / MIB:.0f}{mark} | {result['recompute_peak'] / MIB:.0f} | {batch}{mark} |"
        )
    lines += [
        "",
        "\\* measured at batch 1 only (`--batch1_only`: the shared 2-core machine ran out of memory at batch 2); the",
        "per-step part is then DiP-XL/16's of the same setting plus the bf16 copy of the larger patch embedding.",
        "",
        "`blocks` = `checkpoint_blocks: 26` (every transformer block recomputed in the backward), `blocks+head` adds",
        "`checkpoint_head: true`. bf16 = `precision: bf16-mixed` (autocast; the fp32 master weights are in the static",
        "part). Batch = (budget - static - per step) / (saved per image + recomputed at once per image): under",
        "checkpointing the backward re-materialises one checkpointed call (a block, or the head) for the whole batch.",
        "Activation gradients and the allocator's fragmentation are left to the 10% margin, so the batch is an upper",
        "bound; on the GPU, `torch.cuda.max_memory_allocated` of a real step is the check (`bench/gpu.py`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
