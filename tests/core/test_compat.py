"""One test per library internal the kit relies on (dip_lightning.core.compat): an upgrade that removes or reshapes
one fails here, by name, instead of somewhere deep in a training run."""

from __future__ import annotations

import importlib

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel

from dip_lightning.core import compat
from tests.helpers.toy_fit import ToyRegression, cpu_trainer


@pytest.mark.parametrize(("module", "cls", "method"), compat.OVERRIDDEN_PRIVATE_METHODS)
def test_overridden_private_methods_still_exist(module: str, cls: str, method: str) -> None:
    assert callable(getattr(getattr(importlib.import_module(module), cls), method, None)), f"{cls}.{method}"


def test_given_hyperparameters_is_none_outside_the_cli() -> None:
    assert compat.given_hyperparameters() is None


def test_cluster_environment_sigterm_broadcast_and_batch_progress_in_a_fit() -> None:
    from lightning.fabric.plugins import ClusterEnvironment

    seen: dict[str, object] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            seen["env"] = compat.cluster_environment(trainer)
            seen["skipped"] = compat.skip_sigterm_broadcast(trainer)
            seen["now_skipped"] = compat.sigterm_broadcast_skipped(trainer)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            seen.setdefault("in_flight", compat.batches_in_flight(trainer))

        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            compat.restore_sigterm_broadcast(trainer)
            seen["restored"] = not compat.sigterm_broadcast_skipped(trainer)

    trainer = cpu_trainer(max_steps=2, callbacks=[Probe()])
    trainer.fit(ToyRegression())
    assert isinstance(seen["env"], ClusterEnvironment)
    assert seen["skipped"] and seen["now_skipped"] and seen["restored"]
    assert seen["in_flight"] == 1  # the batch whose step is running


def test_forget_training_loader_makes_the_next_fit_build_its_loader_again() -> None:
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(ToyRegression())
    kept = trainer.fit_loop._combined_loader
    assert kept is not None  # what a finished fit keeps, and a second fit would reuse
    compat.forget_training_loader(trainer)
    assert trainer.fit_loop._combined_loader is None
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(ToyRegression())
    assert trainer.fit_loop._combined_loader is not None and trainer.fit_loop._combined_loader is not kept


def test_average_model_and_swap_of_lightnings_ema() -> None:
    ema = EMAWeightAveraging(decay=0.5)
    model = ToyRegression()
    cpu_trainer(max_steps=2, callbacks=[ema]).fit(model)
    averaged = compat.average_model(ema)
    assert isinstance(averaged, AveragedModel)
    live = model.net.weight.detach().clone()
    compat.swap_averaged_models(ema, model)
    assert torch.equal(averaged.module.net.weight, live)


def test_torch_fidelity_forward_exists() -> None:
    from torchmetrics.image.fid import NoTrainInceptionV3

    assert callable(getattr(NoTrainInceptionV3, "_torch_fidelity_forward", None))


@pytest.mark.parametrize("make", [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD])
def test_fused_optimizers_skip_on_device_when_found_inf_is_set(make) -> None:  # noqa: ANN001
    """found_inf = 1: the fused step changes neither the weights nor any optimizer state (step counts
    included); found_inf = 0: the same update as without the flag (a twin that never saw the flag)."""
    kwargs = {"lr": 0.1, "momentum": 0.9} if make is torch.optim.SGD else {"lr": 0.1}
    assert not compat.supports_device_skip(make([torch.nn.Parameter(torch.zeros(1))], **kwargs))
    flagged, twin = (torch.nn.Parameter(torch.linspace(-1, 1, 5)) for _ in range(2))
    optimizers = [make([p], fused=True, **kwargs) for p in (flagged, twin)]
    assert compat.supports_device_skip(optimizers[0])
    for p, opt in zip((flagged, twin), optimizers):
        p.grad = torch.ones(5)
        opt.step()  # a first real step, so there is state to keep
    state = optimizers[0].state[flagged]
    before = flagged.detach().clone(), {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    flagged.grad = torch.full((5,), float("nan"))
    compat.set_device_skip(optimizers[0], torch.ones(()))
    optimizers[0].step()
    assert torch.equal(flagged.detach(), before[0])
    for key, value in before[1].items():
        assert torch.equal(state[key], value), key
    for p in (flagged, twin):
        p.grad = torch.full((5,), 3.0)
    compat.set_device_skip(optimizers[0], torch.zeros(()))
    optimizers[0].step()
    optimizers[1].step()
    assert torch.equal(flagged.detach(), twin.detach())
    compat.clear_device_skip(optimizers[0])
    assert "found_inf" not in optimizers[0].__dict__


def test_the_launchers_child_observer_watches_the_launchers_own_list_of_ranks() -> None:
    """``stop_launched_processes`` empties ``_SubprocessScriptLauncher.procs`` before killing the ranks, so that
    the observer thread (which SIGKILLs the launching process when a child exits non-zero) sees nothing: it must
    be watching that very list, and stay quiet on an empty one."""
    import inspect
    import signal
    import subprocess
    import sys
    from types import SimpleNamespace

    from lightning.fabric.strategies.launchers import subprocess_script
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    assert "_launch_process_observer(self.procs)" in inspect.getsource(_SubprocessScriptLauncher.launch)
    standin = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # what it would kill
    try:
        children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
        observer = subprocess_script._ChildProcessObserver(main_pid=standin.pid, child_processes=children)
        assert observer._child_processes is children
        launcher = _SubprocessScriptLauncher.__new__(_SubprocessScriptLauncher)
        launcher.procs = children
        rank = children[0]
        trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher))  # what the function reads
        assert compat.stop_launched_processes(trainer) is True
        assert rank.poll() == -signal.SIGKILL  # ended, and waited for
        assert children == [] and observer._run() is True  # the observer finished, killing nothing
        assert standin.poll() is None
        assert compat.stop_launched_processes(trainer) is False
    finally:
        standin.kill()
        standin.wait()
