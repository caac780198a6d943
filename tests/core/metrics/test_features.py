"""dip_lightning.core.metrics.features and .sources: TF1 resize, the Inception wrappers, DINOv2 errors, npz streaming.

Moved from tests/test_fid.py when FID became part of the metrics engine.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dip_lightning.core.metrics.features import (
    FIDHelperInception,
    TorchmetricsInception,
    TorchScriptInception,
    _run_graph_layers,
    resize_bilinear_tf1,
)
from dip_lightning.core.metrics.inception_score import inception_score
from dip_lightning.core.metrics.sources import iter_npz_images
from tests.helpers.metrics import nchw, smooth_images

torch.set_num_threads(1)


def tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Pixel-by-pixel TF1 resize_bilinear(align_corners=False, half_pixel_centers=False), float64."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        sy = y * in_h / out_h
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, in_h - 1)
        dy = sy - y0
        for x in range(out_w):
            sx = x * in_w / out_w
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, in_w - 1)
            dx = sx - x0
            top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
            bottom = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
            out[y, x] = top * (1 - dy) + bottom * dy
    return out


# ------------------------------------------------------------------------------------------------- resize
def test_tf1_resize_matches_pixel_reference_and_not_torch() -> None:
    # TF1's legacy rule: [0, 1] -> 4 pixels samples at 0, 0.5, 1, 1.5 (clamped) -> 0, 0.5, 1, 1.
    line = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert resize_bilinear_tf1(line, (1, 4)).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]

    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 7, 5, generator=g) * 255
    for size in [(13, 11), (3, 4), (7, 5), (299, 299)]:
        out = resize_bilinear_tf1(img, size)
        assert out.shape == (2, 3, *size)
        if size == (299, 299):
            continue
        ref = tf1_resize_reference(img[1, 2].double().numpy(), *size)
        np.testing.assert_allclose(out[1, 2].numpy(), ref, rtol=0, atol=1e-3)
    # torch's bilinear uses half-pixel centres: a visibly different image (why we implement TF1 ourselves).
    torch_out = torch.nn.functional.interpolate(img, size=(13, 11), mode="bilinear", align_corners=False)
    assert (torch_out - resize_bilinear_tf1(img, (13, 11))).abs().max() > 1.0


def test_iter_npz_images_streams_nhwc_and_nchw(tmp_path: Path) -> None:
    images = smooth_images(7, seed=2)  # NHWC like ADM sample files
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez_compressed(tmp_path / "b.npz", arr_0=images.transpose(0, 3, 1, 2))
    for name in ("a.npz", "b.npz"):
        batches = list(iter_npz_images(tmp_path / name, batch_size=3))
        assert [b.shape[0] for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), images)
    assert sum(b.shape[0] for b in iter_npz_images(tmp_path / "a.npz", 4, limit=5)) == 5
    # A slice [start, limit): what one rank of a multi-process evaluation reads.
    part = torch.cat(list(iter_npz_images(tmp_path / "a.npz", 2, limit=6, start=3)))
    np.testing.assert_array_equal(part.permute(0, 2, 3, 1).numpy(), images[3:6])


# ------------------------------------------------------------------------------------------------- extractors
@pytest.mark.slow
def test_missing_weights_raise_errors_that_say_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pt"))):
        FIDHelperInception(path=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt.*nvlabs"):
        TorchScriptInception(str(tmp_path / "inception-2015-12-05.pt"))
    # torch-fidelity is not installed here; with it, a missing weights file names the file and TORCH_HOME.
    with pytest.raises((ImportError, FileNotFoundError), match="weights-inception-2015-12-05-6726825d"):
        TorchmetricsInception()


class _StandInInception(torch.nn.Module):
    """Same call signature as the StyleGAN2-ADA/EDM TorchScript Inception (uint8 in, any size)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, 2048, generator=g), requires_grad=False)
        self.fc = torch.nn.Parameter(torch.randn(2048, 10, generator=g) * 0.05, requires_grad=False)

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        assert img.dtype == torch.uint8
        x = torch.nn.functional.adaptive_avg_pool2d(img.float() / 255.0, 4).flatten(1)
        features = torch.relu(x @ self.proj)
        if return_features:
            return features
        return torch.softmax(features @ self.fc, dim=1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_torchscript_inception_wrapper_with_a_scripted_stand_in(tmp_path: Path) -> None:
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_StandInInception()), str(path))
    extractor = TorchScriptInception(str(path))
    assert extractor.name == "torchscript:inception-2015-12-05.pt" and extractor.has_classifier
    images = nchw(smooth_images(6, seed=0, size=20))
    features = extractor(images)
    assert features.shape == (6, 2048) and features.dtype == torch.float64
    probs = extractor.class_probabilities(images)
    torch.testing.assert_close(probs.sum(1), torch.ones(6, dtype=torch.float64))
    assert inception_score(probs, split_size=3) >= 1.0
    assert extractor.available() == {"pool", "probs"}
    with pytest.raises(TypeError, match="uint8"):
        extractor(images.float())
    extractor.train()
    assert not extractor.training  # never leaves eval mode


@pytest.mark.slow
def test_default_inception_features_separate_real_photos_from_noise() -> None:
    from skimage import data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        arr = getattr(data, name)()
        side = min(arr.shape[:2])
        crop = Image.fromarray(arr[:side, :side, :3]).resize((64, 64), Image.BICUBIC)
        photos.append(np.asarray(crop))
    real = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous()
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    extractor = FIDHelperInception()
    assert extractor.num_features == 2048 and not extractor.has_classifier and extractor.has_spatial
    f = extractor(torch.cat([real, noise]))
    assert f.shape == (8, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    f_real, f_noise = f[:4], f[4:]
    # Pool3 features are post-ReLU averages; a trained net puts noise far from photos, and photos apart.
    assert (f >= 0).all()
    between = torch.cdist(f_real, f_noise).mean()
    within_noise = torch.cdist(f_noise, f_noise).sum() / 12
    assert between > 2 * within_noise
    assert torch.cdist(f_real, f_real).sum() / 12 > within_noise  # photos differ more than noise samples do

    # The wrapper = TF1 resize + (v - 128) / 128 + the TorchScript net (channels-last: float rounding apart).
    manual = extractor.net((resize_bilinear_tf1(real[:1].float(), (299, 299)) - 128) / 128)
    torch.testing.assert_close(f_real[:1], manual.double(), rtol=1e-5, atol=1e-4)

    # On CPU it runs chunks of cpu_batch_size in channels-last: one NCHW pass's features up to float rounding.
    extractor.cpu_batch_size = 3
    chunked = extractor.features(torch.cat([real, noise]), ("pool", "spatial"))
    scaled = (resize_bilinear_tf1(torch.cat([real, noise]).float(), (299, 299)) - 128) / 128
    one_pass = _run_graph_layers(extractor._layers, scaled, want_spatial=True)
    for kind, expected in zip(("pool", "spatial"), one_pass, strict=True):
        assert chunked[kind].shape == expected.shape
        torch.testing.assert_close(chunked[kind], expected.double(), rtol=1e-5, atol=1e-4)


def test_dinov2_features_need_a_local_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dip_lightning.core.metrics.features import DINOv2Features

    monkeypatch.delenv("DIP_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="--dinov2_weights"):
        DINOv2Features()
    monkeypatch.setenv("DIP_DINOV2_WEIGHTS", str(tmp_path / "dinov2_vitl14_pretrain.pth"))
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        DINOv2Features()
