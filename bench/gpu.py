"""GPU benchmark of the project's own model code: DiP-XL/16 variants against the DiT-only baseline, in one run.

    python bench/gpu.py --out gpu.json        # on a CUDA machine; sections in priority order, 480 s budget
    python bench/gpu.py --sections head,train_compiled --models DiT-XL/16,DiP-XL/16+dense2 --out gpu.json
    python bench/gpu.py --smoke                             # tiny models on CPU: checks the script itself

Sections (run in the order given, each skipped whole when the wall-clock budget cannot cover its estimate):
  peak            bf16 matmul peak (8192^3, random data): the MFU denominator, measured in the same run.
  head            the Patch Detailer Head alone on 128 x 256 patches, forward + backward, bf16 autocast: NCHW vs
                  channels_last, dense_conv_side 0/2/4 eager, NHWC 0/2 compiled; ms and TFLOP/s (nominal FLOPs).
  sdpa            which SDPA backends (flash, efficient, cudnn, math) run DiP's attention (head_dim 72) under
                  bf16 autocast, and their forward + backward time for one XL attention layer.
  syncs           host-device syncs per step of a real Lightning fit (DiP-S/16, EMA, progress bar, preemption
                  guard, monitors), located by CUDA's sync debug mode: the step should have none. Needs jsonargparse
                  (DiPModule imports it), which the device image lacks: carry its wheel (BENCHMARKS.md).
  train_eager     training img/s, MFU and peak memory per model, batch 128, bf16 autocast, fused AdamW.
  train_compiled  the same with the model compiled in place (`torch.compile`, default mode).
  sample_eager    sampling ms/img at batch 256: 100 Euler steps with CFG 2.9 on (0.11, 0.97), from timed guided
                  (2B forward) and unguided (B forward) steps: 85 guided + 15 unguided, the grid's composition.
  sample_compiled the same with the model compiled (static shapes, as `sample --compile`).
  latency_eager   one image, 100 steps with CFG (batch 1, doubled inside the interval).
  latency_graphs  the same with `torch.compile(mode="reduce-overhead")` (CUDA graphs), as `sample --compile
                  reduce-overhead`.
Models: DiT-XL/16 (same backbone, LinearHead), DiP-XL/16 (the released computation), DiP-XL/16+denseN (the head's
3x3 convs on maps of side <= N as dense matmuls, `PatchDetailerHead(dense_conv_side=N)`, the same function),
+ckpt (activation checkpointing of every block and the head: memory against speed); variants combine.
MFU = 3 x nominal forward FLOPs x img/s / measured peak; nominal = torch's flop counter on the plain (convolution)
model, batch 1, so a dense variant gets credit for its speed, not for skipping padding work.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_lightning.core.diffusion import EulerSampler, FlowMatching  # noqa: E402
from dip_lightning.core.models import PatchDetailerHead, create_model, model_summary  # noqa: E402
from dip_lightning.core.models.registry import MODEL_CONFIGS  # noqa: E402

START = time.time()
DEFAULT_SECTIONS = (
    "peak,head,syncs,sdpa,train_compiled,sample_compiled,latency_graphs,train_eager,sample_eager"
)
DEFAULT_MODELS = "DiT-XL/16,DiP-XL/16,DiP-XL/16+dense2"
# Rough seconds per model (XL, H200), so that a section is skipped whole rather than cut off midway.
COST = {
    "peak": 5,
    "head": 70,
    "syncs": 30,
    "sdpa": 10,
    "train_eager": 15,
    "train_compiled": 110,
    "sample_eager": 10,
    "sample_compiled": 90,
    "latency_eager": 10,
    "latency_graphs": 80,
}


def left(budget: float) -> float:
    return budget - (time.time() - START)


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
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


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.batch = 4 if self.smoke else args.batch
        self.sample_batch = 4 if self.smoke else args.sample_batch
        self.steps = 3 if self.smoke else 10
        self.nominal_gflops: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.cuda)

    def compile(self, module: torch.nn.Module, mode: str | None = None) -> None:
        # Smoke runs check the plumbing with the eager backend (inductor on CPU takes minutes).
        if self.smoke:
            module.compile(backend="eager", dynamic=False)
        else:
            module.compile(mode=mode, dynamic=False)

    def build(self, name: str) -> torch.nn.Module:
        base, *variants = name.split("+")
        kw: dict = {}
        if self.smoke:
            kw = dict(input_size=32, hidden_size=64, depth=2, num_heads=2, num_classes=10)
        for variant in variants:
            if variant.startswith("dense"):
                kw["head"] = functools.partial(PatchDetailerHead, dense_conv_side=int(variant[5:]))
            elif variant == "ckpt":  # activation checkpointing of every block and the head
                kw["checkpoint_blocks"] = kw.get("depth", MODEL_CONFIGS[base]["depth"])
                kw["checkpoint_head"] = True
            else:
                raise ValueError(f"unknown variant {variant!r} (known: denseN, ckpt)")
        model = create_model(base, **kw)
        if base not in self.nominal_gflops:
            self.nominal_gflops[base] = 2 * model_summary(model)["gmacs_total"]
        return model.to(self.device)

    def free(self) -> None:
        # Compiled code is cached per code object and guarded on the module instance: without a reset, every
        # model built later counts as a recompilation of the same forward (and hits dynamo's limit).
        torch._dynamo.reset()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ sections
    def peak(self) -> dict:
        n = 512 if self.smoke else 8192
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        return {"tflops": 2 * n**3 / timed(lambda: a @ b, 10, self.device) / 1e12, "n": n}

    def head(self) -> dict:
        """The head alone, forward + backward (into its parameters and the tokens), as in training."""
        hidden, patch = (64, 16) if self.smoke else (1152, 16)
        patches_n = self.batch * (16 if self.smoke else 256)
        width = {"base_channels": 8} if self.smoke else {}
        ref = PatchDetailerHead(hidden, patch, 3, **width)
        gflop_fwd = 2 * _conv_macs(hidden, patch, **width) * patches_n / 1e9  # nominal, convolution form
        x = torch.randn(patches_n, 3, patch, patch, device=self.device)
        tokens = torch.randn(patches_n, hidden, device=self.device, requires_grad=True)
        out: dict = {"patches": patches_n, "gflop_fwd_nominal": gflop_fwd}
        variants = [(cl, side, False) for cl in (False, True) for side in (0, 2, 4)]
        variants += [(True, side, True) for side in (0, 2)]
        for channels_last, side, compiled in variants:
            key = f"{'nhwc' if channels_last else 'nchw'}_dense{side}_{'compiled' if compiled else 'eager'}"
            head = PatchDetailerHead(
                hidden, patch, 3, channels_last=channels_last, dense_conv_side=side, **width
            )
            head.load_state_dict(ref.state_dict())
            head = head.to(self.device)
            if compiled:
                self.compile(head)

            def step(head: torch.nn.Module = head) -> None:
                with self.autocast():
                    y = head(x, tokens, None)
                y.float().square().mean().backward()

            try:
                for _ in range(3):
                    step()
                sec = timed(step, self.steps, self.device)
                out[key] = {"ms": 1e3 * sec, "tflops": 3 * gflop_fwd / sec / 1e3}
            except Exception as err:  # noqa: BLE001 - one failed variant must not lose the others
                out[key] = f"error: {type(err).__name__}: {err}"[:300]
            print("head", key, out[key], flush=True)
            del head
            self.free()
        if self.args.profile and self.cuda:
            try:
                out["profile_nhwc_dense0_eager"] = self.profile_head(hidden, patch, x, tokens)
            except Exception as err:  # noqa: BLE001 - the profile is an extra
                out["profile_nhwc_dense0_eager"] = f"error: {type(err).__name__}: {err}"[:300]
        return out

    def profile_head(self, hidden: int, patch: int, x: torch.Tensor, tokens: torch.Tensor) -> list:
        head = PatchDetailerHead(hidden, patch, 3).to(self.device)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                with self.autocast():
                    y = head(x, tokens, None)
                y.float().square().mean().backward()
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        return [{"name": e.key[:120], "cuda_ms": e.device_time_total / 1e3 / 3} for e in events[:20]]

    def sdpa(self) -> dict:
        """Whether DiP's attention (head_dim 72, QK-RMSNorm and RoPE in fp32, bf16 autocast) can run on each SDPA
        backend: forward + backward of one XL attention layer with only that backend allowed."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from dip_lightning.core.models.backbone import Attention, rope_2d_grid

        dim, heads = (64, 2) if self.smoke else (1152, 16)
        attn = Attention(dim, heads).to(self.device)
        x = torch.randn(self.batch, 256, dim, device=self.device, requires_grad=True)
        rope = rope_2d_grid(16, 16, dim // heads, device=self.device)
        out: dict = {"head_dim": dim // heads}
        backends = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }
        for name, backend in backends.items():

            def step(backend: SDPBackend = backend) -> None:
                with sdpa_kernel([backend]), self.autocast():
                    y = attn(x, rope)
                y.float().sum().backward()

            try:
                step()
                out[name] = {"ms_fwd_bwd": 1e3 * timed(step, 5, self.device)}
            except Exception as err:  # noqa: BLE001 - "not available" is the answer for that backend
                out[name] = f"unavailable: {type(err).__name__}: {str(err)[:200]}"
        return out

    def syncs(self) -> dict:
        """Host-device synchronisations per training step of a real Lightning fit (DiPModule, EMA, the CLI's
        progress bar, preemption guard and monitors, bf16-mixed), counted by CUDA's sync debug mode after warm-up."""
        import warnings

        import lightning.pytorch as pl

        from dip_lightning.training.callbacks import EMA, RichProgress, TrainingMonitor
        from dip_lightning.training.callbacks.preemption import PreemptionGuard
        from dip_lightning.training.module import DiPModule

        kw = dict(input_size=32, hidden_size=64, depth=2, num_heads=2, num_classes=10) if self.smoke else {}
        module = DiPModule(create_model("DiP-S/16", **kw))
        size, n = module.net.input_size, 32 * 40
        data = torch.utils.data.TensorDataset(
            torch.rand(n, 3, size, size) * 2 - 1, torch.randint(0, module.num_classes, (n,))
        )
        loader = torch.utils.data.DataLoader(data, batch_size=32, pin_memory=self.cuda, drop_last=True)
        warmup, steps = 10, 30
        cuda = self.cuda

        class Watch(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
                if trainer.global_step == warmup and cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")

            def on_train_end(self, trainer, pl_module):  # noqa: ANN001
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)

        trainer = pl.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            precision="bf16-mixed" if cuda else "32-true",
            max_steps=steps,
            log_every_n_steps=50,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[
                EMA(decay=0.999),
                RichProgress(),
                PreemptionGuard(check_every_n_steps=10),
                TrainingMonitor(),
                Watch(),
            ],
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, train_dataloaders=loader)
        found = [w for w in caught if "synchroniz" in str(w.message)]
        places: dict[str, int] = {}
        for w in found:
            key = f"{Path(w.filename).name}:{w.lineno}"
            places[key] = places.get(key, 0) + 1
        return {
            "steps_watched": steps - warmup,
            "syncs": len(found) if cuda else "n/a (cpu)",
            "syncs_per_step": len(found) / (steps - warmup) if cuda else None,
            "where": dict(sorted(places.items(), key=lambda kv: -kv[1])[:15]),
        }

    def train(self, name: str, compiled: bool) -> dict:
        model = self.build(name).train()
        if compiled:
            self.compile(model)
        flow = FlowMatching()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=self.cuda)
        size = model.input_size
        x = torch.rand(self.batch, 3, size, size, device=self.device) * 2 - 1
        y = torch.randint(0, model.num_classes, (self.batch,), device=self.device)

        def step() -> None:
            x_t, t, y_in, target = flow.training_inputs(x, y, null_class=model.null_class)
            with self.autocast():
                v = model(x_t, t, y_in)
            flow.prediction_loss(v, x_t, t, target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.time()
        for _ in range(3):
            step()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warm = time.time() - t0
        sec = timed(step, self.steps, self.device)
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
        return {"img_per_s": self.batch / sec, "step_s": sec, "peak_mem_gib": mem, "warmup_s": warm}

    @torch.no_grad()
    def sample(self, name: str, compiled: bool) -> dict:
        model = self.build(name).eval()
        if compiled:
            self.compile(model)
        size, batch = model.input_size, self.sample_batch
        x = torch.randn(batch, 3, size, size, device=self.device)
        y = torch.randint(0, model.num_classes, (batch,), device=self.device)
        sampler = EulerSampler(num_steps=100, cfg_scale=2.9, cfg_interval=(0.11, 0.97))
        times = sampler.timesteps()
        guided_t = next(float(t) for t in times[:-1] if sampler.guided(float(t)))
        plain_t = float(times[0])

        def one(t: float) -> None:
            with self.autocast():
                sampler.velocity(model, x, t, y, model.null_class)

        t0 = time.time()
        for t in (guided_t, plain_t, guided_t, plain_t):
            one(t)
        warm = time.time() - t0
        guided = timed(lambda: one(guided_t), 5, self.device)
        plain = timed(lambda: one(plain_t), 5, self.device)
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
            "warmup_s": warm,
        }

    @torch.no_grad()
    def latency(self, name: str, graphs: bool) -> dict:
        model = self.build(name).eval()
        if graphs:
            self.compile(model, mode="reduce-overhead")
        size = model.input_size
        noise = torch.randn(1, 3, size, size, device=self.device)
        y = torch.tensor([207], device=self.device) % model.num_classes
        sampler = EulerSampler(num_steps=10 if self.smoke else 100, cfg_scale=2.9, cfg_interval=(0.11, 0.97))

        def run() -> None:
            with self.autocast():
                sampler.sample(model, noise, y, null_class=model.null_class)

        t0 = time.time()
        run()
        run()
        warm = time.time() - t0
        sec = timed(run, 3, self.device)
        return {"s": sec, "warmup_s": warm}


def _conv_macs(hidden: int, patch: int, **head_kwargs: int) -> int:
    """Nominal MACs of the plain head on one patch (convolutions, padding included), by the flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        head = PatchDetailerHead(hidden, patch, 3, **head_kwargs)
        x, tokens = torch.zeros(1, 3, patch, patch), torch.zeros(1, hidden)
    with FlopCounterMode(display=False) as counter:
        head(x, tokens, None)
    return counter.get_total_flops() // 2


def summarise(res: dict) -> None:
    """MFU per training row and each DiP variant's head overhead against DiT-XL/16 in the same section."""
    peak = res.get("peak", {}).get("tflops")
    nominal = res.get("nominal_fwd_gflops", {})
    for section in ("train_eager", "train_compiled"):
        for name, row in res.get(section, {}).items():
            if isinstance(row, dict) and peak:
                gflops = nominal[name.partition("+")[0]]
                row["mfu"] = 3 * gflops * 1e9 * row["img_per_s"] / (peak * 1e12)
    overhead: dict = {}
    for section, rows in res.items():
        if isinstance(rows, dict) and isinstance(rows.get("DiT-XL/16"), dict):
            overhead |= _head_overhead(section, rows)
    res["head_overhead"] = overhead
    if "DiP-XL/16" in nominal and "DiT-XL/16" in nominal:
        res["head_flop_share"] = 1 - nominal["DiT-XL/16"] / nominal["DiP-XL/16"]


def _head_overhead(section: str, rows: dict) -> dict:
    """``{"<section> <variant>": 1 - variant speed / DiT-XL/16 speed}`` for one section's rows."""
    base = rows["DiT-XL/16"]
    overhead = {}
    for name, row in rows.items():
        if name == "DiT-XL/16" or not isinstance(row, dict):
            continue
        if "img_per_s" in row:
            overhead[f"{section} {name}"] = 1 - row["img_per_s"] / base["img_per_s"]
        elif "ms_per_image" in row:
            overhead[f"{section} {name}"] = 1 - base["ms_per_image"] / row["ms_per_image"]
        elif "s" in row:
            overhead[f"{section} {name}"] = 1 - base["s"] / row["s"]
    return overhead


def run_row(bench: Bench, args: argparse.Namespace, section: str, measure: Any) -> Any:
    """One measurement, skipped when the budget would overrun; a failure is recorded, never fatal (a failed row
    must not lose the others)."""
    if left(args.budget) < COST[section] and not args.smoke:
        return "skipped: budget"
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - recorded in the results
        return f"error: {type(err).__name__}: {err}"[:300]
    finally:
        bench.free()  # the row's model and optimizer are gone with its frame


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, to check the script")
    p.add_argument(
        "--budget", type=float, default=480.0, help="seconds; sections that would overrun are skipped"
    )
    p.add_argument(
        "--sections", default=DEFAULT_SECTIONS, help=f"comma-separated, in order ({DEFAULT_SECTIONS})"
    )
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated: DiT-XL/16, DiP-XL/16[+denseN]")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="head section: top CUDA kernels of the eager head")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(COST))
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {sorted(COST)}")
    models = [m for m in args.models.split(",") if m]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args)
    res: dict = {
        "device": torch.cuda.get_device_name() if bench.cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "smoke": args.smoke,
        "batch": bench.batch,
        "sample_batch": bench.sample_batch,
    }

    def save() -> None:
        res["nominal_fwd_gflops"] = bench.nominal_gflops
        res["wall_s"] = time.time() - START
        summarise(res)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))

    per_model = {
        "train_eager": lambda n: bench.train(n, compiled=False),
        "train_compiled": lambda n: bench.train(n, compiled=True),
        "sample_eager": lambda n: bench.sample(n, compiled=False),
        "sample_compiled": lambda n: bench.sample(n, compiled=True),
        "latency_eager": lambda n: bench.latency(n, graphs=False),
        "latency_graphs": lambda n: bench.latency(n, graphs=True),
    }
    for section in sections:
        if section in ("peak", "head", "syncs", "sdpa"):
            res[section] = run_row(bench, args, section, getattr(bench, section))
            print(section, res[section] if section == "peak" else "done", flush=True)
            save()
            continue
        res[section] = {}
        for name in models:
            res[section][name] = run_row(bench, args, section, functools.partial(per_model[section], name))
            print(section, name, res[section][name], flush=True)
            save()
    save()
    print(
        json.dumps({k: res[k] for k in ("head_overhead", "head_flop_share", "wall_s") if k in res}, indent=1)
    )


if __name__ == "__main__":
    main()
