"""The EMA update never reads its count back from the device, and computes exactly torch's average."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dip_lightning.core.compat import average_model
from dip_lightning.training.callbacks import EMA
from dip_lightning.training.callbacks.ema import HostCountedAveragedModel
from tests.helpers.toy_fit import ToyRegression, cpu_trainer


def small_net() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm brings float buffers and an integer one (num_batches_tracked): both dtype paths of the update.
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def perturb(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        net.train()(torch.randn(16, 4, generator=g))  # updates the BatchNorm buffers


def averaged(cls: type, net: nn.Module) -> AveragedModel:
    return cls(net, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.9))


def assert_same(a: AveragedModel, b: AveragedModel) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_host_counted_average_equals_torchs_and_survives_a_reload():
    net = small_net()
    ref, ours = averaged(AveragedModel, net), averaged(HostCountedAveragedModel, net)
    for step in range(4):
        perturb(net, step)
        ref.update_parameters(net)
        ours.update_parameters(net)
        assert_same(ref, ours)
    assert ours.host_count == 4 == int(ours.n_averaged)
    resumed = averaged(HostCountedAveragedModel, small_net())
    resumed.load_state_dict(ours.state_dict())  # as EMA.on_load_checkpoint does
    assert resumed.host_count == 4  # the loaded count is a CPU tensor: read without a device sync
    for step in range(4, 7):
        perturb(net, step)
        ref.update_parameters(net)
        resumed.update_parameters(net)
        assert_same(ref, resumed)
    assert resumed.host_count == 7


def count_tensor_reads(monkeypatch, reads: list[str]) -> None:  # noqa: ANN001
    """Record every tensor-to-Python read (on a GPU each is a host-device synchronisation)."""
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item

    def counting_bool(self):  # noqa: ANN001, ANN202
        reads.append("bool")
        return real_bool(self)

    def counting_item(self):  # noqa: ANN001, ANN202
        reads.append("item")
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)


def test_updates_after_the_first_make_no_tensor_to_python_reads(monkeypatch):
    reads: list[str] = []
    net = small_net()
    ref, ours = averaged(AveragedModel, net), averaged(HostCountedAveragedModel, net)
    ours.update_parameters(net)  # the first update copies (torch's own code, reads allowed once)
    ref.update_parameters(net)
    count_tensor_reads(monkeypatch, reads)
    for step in range(3):
        perturb(net, step)
        ours.update_parameters(net)
    ours_reads = len(reads)
    ref.update_parameters(net)
    assert ours_reads == 0
    assert len(reads) >= 2  # torch's update: bool(n_averaged == 0) and `if n_averaged > 0`


def regression() -> ToyRegression:
    return ToyRegression(small_net(), samples=40, batch_size=4)


def test_ema_callback_uses_the_host_counted_average():
    steps = 7
    ema = EMA(decay=0.9)
    cpu_trainer(max_steps=steps, callbacks=[ema]).fit(regression())
    assert type(average_model(ema)) is HostCountedAveragedModel
    assert ema.num_updates == steps == int(average_model(ema).n_averaged)


def test_several_decays_update_without_tensor_reads(monkeypatch):
    """A real fit with three decays: after the first update, the callback's per-step work (the first average
    and the two further ones) reads no tensor back to Python."""
    ema = EMA(decays=[0.9, 0.5, 0.2])
    reads: list[str] = []
    hook = ema.on_train_batch_end

    def watched(trainer, *args):  # noqa: ANN001, ANN002, ANN202
        if trainer.global_step < 2:  # the step of the first update runs torch's own copy
            return hook(trainer, *args)
        with monkeypatch.context() as patch:
            count_tensor_reads(patch, reads)
            return hook(trainer, *args)

    monkeypatch.setattr(ema, "on_train_batch_end", watched)
    cpu_trainer(max_steps=6, callbacks=[ema]).fit(regression())
    assert ema.num_updates == 6 and reads == []
    averages = ema.averages()
    assert list(averages) == [0.9, 0.5, 0.2]
    for slow, fast in ((0.9, 0.5), (0.5, 0.2)):
        assert not torch.equal(averages[slow]["net.0.weight"], averages[fast]["net.0.weight"])


def test_averages_live_on_the_training_device():
    """Lightning copies the module at callback setup, before the strategy moves it to its device (the module is
    still on the CPU there when training on a GPU); the averages must still end up on the training device.
    ``meta`` stands in for the GPU on a CPU-only machine."""
    module = regression()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    ema = EMA(decays=[0.9, 0.5])
    ema.setup(trainer, module, "fit")
    assert {p.device.type for p in average_model(ema).parameters()} == {"meta"}
    assert {t.device.type for t in ema.averages()[0.5].values()} == {"meta"}
    assert ema.num_updates == 0
    pinned = EMA(decay=0.9, device="cpu")  # an explicit device stays where it was asked to be
    pinned.setup(trainer, module, "fit")
    assert {p.device.type for p in average_model(pinned).parameters()} == {"cpu"}
