"""PSNR (Eq. 8, peak 255), SSIM and the 0-255 intensity rule; pyiqa calibration images."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from microct_sr.metrics import fidelity

CALIB_IMAGES = ("I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp")


def pyiqa_calibration_dir() -> Path:
    """``ResultsCalibra`` shipped in the pyiqa wheel (skips with the reason when absent)."""
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or spec.origin is None:
        pytest.skip("pyiqa is not installed (extra microct-sr[iqa]): its calibration images "
                    "ship inside its wheel")
    d = Path(spec.origin).parents[1] / "ResultsCalibra"
    if not (d / "dist_dir").is_dir() or not (d / "ref_dir").is_dir():
        pytest.skip(f"pyiqa's calibration images not found at {d}")
    return d


def published(shared: Path, csv_name: str, row: str) -> dict[str, float]:
    """{image: value} of one metric row of ../shared/data/iqa/<csv_name>."""
    with open(shared / "iqa" / csv_name, newline="") as f:
        for r in csv.DictReader(f):
            if r["Method"] == row:
                return {k: float(v) for k, v in r.items() if k != "Method"}
    raise AssertionError(f"row {row!r} missing from {csv_name}")


def test_psnr_is_eq8_with_peak_255():
    hr = np.zeros((16, 16))
    sr = hr.copy()
    sr[:4] = 8.0  # MSE = 64 / 4 = 16
    assert fidelity.psnr(sr, hr) == pytest.approx(10 * math.log10(255 ** 2 / 16.0), abs=1e-12)
    assert fidelity.psnr(hr, hr) == math.inf


def test_16_bit_rule_maps_hr_range_to_0_255_and_clips():
    window = fidelity.intensity_window(np.uint16, 1000, 5000)
    assert window == (1000.0, 5000.0)
    x = np.array([0, 1000, 3000, 5000, 65535], np.uint16)
    np.testing.assert_allclose(fidelity.to_255(x, window), [0, 0, 127.5, 255, 255])
    assert fidelity.intensity_window(np.uint8, 3, 40) == (0.0, 255.0)
    with pytest.raises(ValueError, match="constant"):
        fidelity.intensity_window(np.uint16, 7, 7)


def test_ssim_one_for_identical_and_drops_with_noise():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (64, 64))
    assert fidelity.ssim(img, img) == pytest.approx(1.0)
    scores = [fidelity.ssim(np.clip(img + rng.normal(0, s, img.shape), 0, 255), img)
              for s in (5, 20, 60)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_window_is_11_px_and_smaller_images_are_refused_clearly():
    """scikit-image's Gaussian SSIM window (sigma 1.5) is 11x11, not the 7x7 its error names."""
    img = np.random.default_rng(0).uniform(0, 255, (11, 11))
    assert fidelity.SSIM_WINDOW == 11
    assert fidelity.ssim(img, img) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11x11 pixels, got 10x11"):
        fidelity.ssim(img[:10], img[:10])


@pytest.mark.parametrize("mu1,mu2", [(100.0, 140.0), (2.0, 6.0), (0.0, 10.0), (250.0, 30.0)])
def test_ssim_of_constant_images_is_the_luminance_term_with_peak_255(mu1: float, mu2: float):
    """Two constant images have no variance, so SSIM is Wang et al.'s luminance term alone,
    (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1) with C1 = (0.01 * 255)^2: this pins the data
    range to 255 (with 2 * 255, dark pairs such as 2 vs 6 score 0.76 instead of 0.66)."""
    c1 = (0.01 * 255) ** 2
    a, b = np.full((32, 40), mu1), np.full((32, 40), mu2)
    want = (2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1)
    assert fidelity.ssim(a, b) == pytest.approx(want, rel=1e-9, abs=1e-12)


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 written out: local means, population (co)variances under an 11x11
    Gaussian window (sigma 1.5, truncated at 3.5 sigma = radius 5), K1 0.01, K2 0.03, L 255,
    averaged over the map where the window lies inside the image (MATLAB's 'valid', i.e. a
    5-pixel border dropped, as scikit-image crops it)."""
    from scipy.ndimage import gaussian_filter

    def blur(img: np.ndarray) -> np.ndarray:
        return gaussian_filter(img, 1.5, truncate=3.5, mode="reflect")

    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_ssim_matches_a_gaussian_window_reference_on_a_bone_like_pair():
    """On a trabecular-looking slice and an SR-like estimate of it (blurred, noisy), SSIM is
    the 11x11 Gaussian-window SSIM written out in the test, to 1e-9 (a 7x7 uniform window,
    sample covariance, another data range or no border crop are all > 1e-4 away)."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    field = ndimage.gaussian_filter(rng.normal(size=(72, 88)), 2.5)
    hr = np.where(field > np.quantile(field, 0.7), 200.0, 60.0) + rng.normal(0, 5, field.shape)
    hr = np.clip(ndimage.gaussian_filter(hr, 0.6), 0, 255)
    sr = np.clip(ndimage.gaussian_filter(hr, 1.2) + rng.normal(0, 12, hr.shape), 0, 255)
    want = _reference_ssim(sr, hr)
    assert 0.2 < want < 0.9  # a pair where the window and the constants matter
    assert fidelity.ssim(sr, hr) == pytest.approx(want, abs=1e-9)
    assert fidelity.ssim(hr, sr) == pytest.approx(want, abs=1e-9)


def test_crop_border():
    a = np.arange(100).reshape(10, 10)
    assert fidelity.crop_border(a, 4).shape == (2, 2)
    with pytest.raises(ValueError):
        fidelity.crop_border(a, 5)


@pytest.mark.iqa
@pytest.mark.parametrize("name", CALIB_IMAGES)
def test_psnr_and_ssim_on_pyiqa_calibration_images(shared_data, name):
    from skimage.io import imread

    d = pyiqa_calibration_dir()
    dist, ref = imread(d / "dist_dir" / name), imread(d / "ref_dir" / name)
    # PSNR over the RGB values (pyiqa's "psnr", test_y_channel=False)
    ours = fidelity.psnr(dist, ref)
    assert abs(ours - published(shared_data, "calibration_summary.csv", "psnr(ours)")[name]) < 0.01
    assert abs(ours - published(shared_data, "results_official.csv", "psnr")[name]) < 0.01
    # SSIM on the Y channel (pyiqa's "ssim", test_y_channel=True) vs the official MATLAB value
    y = [_y_channel(im) for im in (dist, ref)]
    assert abs(fidelity.ssim(*y) - published(shared_data, "results_official.csv",
                                             "ssim")[name]) < 0.001


def _y_channel(rgb: np.ndarray) -> np.ndarray:
    """Rounded Y of YIQ on 0-255, the conversion pyiqa applies (float32, like its calibration)."""
    import torch
    from pyiqa.utils.color_util import to_y_channel

    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    return to_y_channel(t, 255, "yiq")[0, 0].numpy().astype(np.float64)


def test_light_modules_never_import_pyiqa():
    code = ("import sys\n"
            "import microct_sr.metrics, microct_sr.metrics.fidelity, "
            "microct_sr.metrics.morphometry, microct_sr.metrics.report\n"
            "import microct_sr.cli.upscale, microct_sr.cli.pair, microct_sr.cli.simulate, "
            "microct_sr.cli.train, microct_sr.cli.evaluate\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'pyiqa']\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
