"""GPU benchmark of the project's own model code: DiP-XL/16 vs the DiT-only baseline, in one run.

    python bench/gpu.py --out results.json              # on a CUDA machine (fits a ~7-minute run)
    python bench/gpu.py --smoke                          # tiny models on CPU: checks the script itself

Measures, in priority order and under a wall-clock budget (later sections are skipped, never half-run):
  1. bf16 matmul peak (8192^3, random data) -> the MFU denominator measured in the same run;
  2. training img/s, MFU and peak memory: DiP-XL/16 and DiT-XL/16 (LinearHead), eager, bf16 autocast, fused AdamW;
  3. sampling: 100 Euler steps with CFG 2.9 on (0.11, 0.97) at batch 256, from timed guided (2B forward) and
     unguided (B forward) steps: total = 85 guided + 15 unguided (the grid's composition, see EulerSampler);
  4. single-image latency, 100 steps with CFG (batch 1, doubled inside the interval), eager;
  5. the same training step with `torch.compile` (model compiled in place);
  6. single-image latency with CUDA graphs (`torch.compile(mode="reduce-overhead")`).
MFU = 3 x forward FLOPs x img/s / measured peak (forward FLOPs from torch's flop counter, batch 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_lightning.diffusion import EulerSampler, FlowMatching  # noqa: E402
from dip_lightning.models import create_model, model_summary  # noqa: E402

START = time.time()


def left(budget: float) -> float:
    return budget - (time.time() - START)


def timed(fn, reps: int, device: torch.device) -> float:  # noqa: ANN001
    """Median seconds per call, CUDA events on GPU."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sec = timed(lambda: a @ b, 10, device)
    return 2 * n**3 / sec


def build(name: str, smoke: bool, device: torch.device) -> torch.nn.Module:
    kw = dict(input_size=32, hidden_size=64, depth=2, num_heads=2, num_classes=10) if smoke else {}
    return create_model(name, **kw).to(device)


def train_bench(model, batch: int, steps: int, device: torch.device, dtype: torch.dtype) -> dict:  # noqa: ANN001
    model.train()
    flow = FlowMatching()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused)
    size = model.input_size
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step() -> None:
        x_t, t, y_in, target = flow.training_inputs(x, y, null_class=model.null_class)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            v = model(x_t, t, y_in)
        loss = flow.loss(v, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.time()
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm = time.time() - t0
    sec = timed(step, steps, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"img_per_s": batch / sec, "step_s": sec, "peak_mem_gib": mem, "warmup_s": warm, "batch": batch}


@torch.no_grad()
def sample_step_bench(model, batch: int, device: torch.device, dtype: torch.dtype) -> dict:  # noqa: ANN001
    model.eval()
    size = model.input_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    sampler = EulerSampler(num_steps=100, cfg_scale=2.9, cfg_interval=(0.11, 0.97))
    times = sampler.timesteps()
    guided_t = next(float(t) for t in times[:-1] if sampler.guided(float(t)))
    plain_t = float(times[0])

    def one(t: float) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            sampler.velocity(model, x, t, y, model.null_class)

    for t in (guided_t, plain_t):
        one(t)
    guided = timed(lambda: one(guided_t), 5, device)
    plain = timed(lambda: one(plain_t), 5, device)
    n_guided = sum(sampler.guided(float(t)) for t in times[:-1])
    n_plain = len(times) - 1 - n_guided
    total = n_guided * guided + n_plain * plain
    return {
        "batch": batch,
        "guided_step_s": guided,
        "plain_step_s": plain,
        "steps_guided": n_guided,
        "steps_plain": n_plain,
        "ms_per_image": 1e3 * total / batch,
        "nfe": sampler.nfe(),
    }


@torch.no_grad()
def latency_bench(model, device: torch.device, dtype: torch.dtype, reps: int = 3) -> float:  # noqa: ANN001
    model.eval()
    size = model.input_size
    noise = torch.randn(1, 3, size, size, device=device)
    y = torch.tensor([207], device=device) % model.num_classes
    sampler = EulerSampler(num_steps=100, cfg_scale=2.9, cfg_interval=(0.11, 0.97))

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            sampler.sample(model, noise, y, null_class=model.null_class)

    run()
    return timed(run, reps, device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, to check the script")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16
    res: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))

    res["peak_tflops"] = matmul_peak(device, 512 if args.smoke else 8192) / 1e12
    print(f"bf16 matmul peak: {res['peak_tflops']:.0f} TFLOP/s", flush=True)
    batch = 4 if args.smoke else args.batch
    sbatch = 4 if args.smoke else args.sample_batch
    steps = 3 if args.smoke else 10
    names = ("DiP-XL/16", "DiT-XL/16")
    models = {}
    for name in names:
        m = build(name, args.smoke, device)
        s = model_summary(m)
        res[name] = {"params_m": s["params_total"] / 1e6, "fwd_gflops": 2 * s["gmacs_total"]}
        models[name] = m
    sections = [
        ("train_eager", lambda n: train_bench(models[n], batch, steps, device, dtype)),
        ("sample_eager", lambda n: sample_step_bench(models[n], sbatch, device, dtype)),
        ("latency_eager_s", lambda n: latency_bench(models[n], device, dtype)),
    ]
    for key, fn in sections:
        for name in names:
            if left(args.budget) < 30:
                print(f"skip {key} {name}: budget", flush=True)
                continue
            try:
                res[name][key] = fn(name)
            except Exception as err:  # noqa: BLE001 - a failed section must not lose the others
                res[name][key] = f"error: {type(err).__name__}: {err}"[:300]
            print(name, key, res[name][key], flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # Compiled: only with enough budget left (compiling XL costs ~1 minute each).
    for name in names:
        if left(args.budget) < 120:
            print(f"skip compiled {name}: budget", flush=True)
            continue
        try:
            models[name].compile()
            res[name]["train_compiled"] = train_bench(models[name], batch, steps, device, dtype)
        except Exception as err:  # noqa: BLE001
            res[name]["train_compiled"] = f"error: {type(err).__name__}: {err}"[:300]
        print(name, "train_compiled", res[name]["train_compiled"], flush=True)
        save()
    if left(args.budget) > 90:
        name = names[0]
        try:
            graphed = torch.compile(build(name, args.smoke, device), mode="reduce-overhead")
            graphed.input_size, graphed.num_classes, graphed.null_class = (
                models[name].input_size,
                models[name].num_classes,
                models[name].null_class,
            )
            res[name]["latency_cudagraph_s"] = latency_bench(graphed, device, dtype)
        except Exception as err:  # noqa: BLE001
            res[name]["latency_cudagraph_s"] = f"error: {type(err).__name__}: {err}"[:300]
        print(name, "latency_cudagraph_s", res[name]["latency_cudagraph_s"], flush=True)
    # Summary: MFU and the head's overhead (same run, same card).
    peak = res["peak_tflops"] * 1e12
    for name in names:
        r = res[name]
        for key in ("train_eager", "train_compiled"):
            if isinstance(r.get(key), dict):
                r[key]["mfu"] = 3 * r["fwd_gflops"] * 1e9 * r[key]["img_per_s"] / peak
    dip, dit = res[names[0]], res[names[1]]
    for key in ("train_eager", "train_compiled", "sample_eager"):
        if isinstance(dip.get(key), dict) and isinstance(dit.get(key), dict):
            if key.startswith("train"):
                res[f"head_overhead_{key}"] = 1 - dip[key]["img_per_s"] / dit[key]["img_per_s"]
            else:
                res[f"head_overhead_{key}"] = 1 - dit[key]["ms_per_image"] / dip[key]["ms_per_image"]
    res["head_flop_share"] = 1 - dit["fwd_gflops"] / dip["fwd_gflops"]
    res["wall_s"] = time.time() - START
    save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
