"""`evaluate` at scan sizes: what it reads and keeps does not grow with the slice count beyond
what the comparison needs (counted on small in-memory volumes, never timed or RSS-measured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _volume_files import ArrayVolume
from skimage.filters import threshold_otsu

import microct_sr.progress
from microct_sr.metrics import evaluate as ev


def two_phase(shape: tuple[int, int, int], dtype: str, seed: int = 0) -> np.ndarray:
    """Bone (1800) and marrow (300) blocks with noise, as a 16-bit signed CT export."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    bone = ((x // 6 + y // 6 + z // 4) % 3) == 0
    a = np.where(bone, 1800.0, 300.0) + rng.normal(0, 60, shape)
    return a.astype(dtype)


@pytest.mark.parametrize("n_lr", [8, 64])
def test_otsu_samples_of_a_signed_hr_stay_bounded(monkeypatch, n_lr):
    """int16/float HR: the Otsu samples were a quarter of every compared slice, kept in a list
    (820 MB for 500 compared 1280 x 1280 slices, then copied by np.concatenate); now a seeded
    sample keeps their total within OTSU_MAX_SAMPLES whatever the slice count."""
    cap = 1000
    monkeypatch.setattr(ev, "OTSU_MAX_SAMPLES", cap, raising=False)
    seen: list[int] = []
    real_histogram = np.histogram

    def spy(a, *args, **kw):
        seen.append(np.asarray(a).size)
        return real_histogram(a, *args, **kw)

    monkeypatch.setattr(np, "histogram", spy)
    hr = ArrayVolume(two_phase((8 * n_lr, 64, 64), "int16"), (10.0, 10.0, 10.0))
    grid = ev.match_grid((n_lr, 64, 64), hr.shape, "sr", hr.path)
    opts = ev.EvalOptions(metrics={"psnr", "morph"}, quiet=True)
    ref = ev.reference_stats(hr, grid, opts)
    assert seen and max(seen) <= cap
    compared = hr.array[4::8]
    exact = threshold_otsu(compared.astype(float))
    assert abs(ref.threshold - exact) < 100  # modes 1500 apart
    assert ((compared > ref.threshold) == (compared > exact)).mean() > 0.99


def test_otsu_sample_keeps_small_volumes_at_a_quarter():
    rng = np.random.default_rng(0)
    a = np.arange(128 * 128, dtype=np.float32).reshape(128, 128)
    np.testing.assert_array_equal(ev.otsu_sample(a, 4, rng), a[::2, ::2].ravel())  # unchanged
    big = np.zeros((1280, 1280), np.int16)
    for n in (25, 500, 4000):
        assert n * ev.otsu_sample(big, n, rng).size <= ev.OTSU_MAX_SAMPLES


def test_morphometry_shows_progress_per_phase(monkeypatch):
    """Morphometry on the 16 M-voxel window takes minutes per volume (HR, each method): each
    local-thickness sweep has a progress bar named after the method and the phase."""
    descs: list[str] = []
    real = microct_sr.progress.progress

    def spy(*args, **kw):
        descs.append(kw.get("desc", ""))
        return real(*args, **kw)

    monkeypatch.setattr(microct_sr.progress, "progress", spy)
    hr = ArrayVolume(two_phase((32, 48, 48), "uint16"), (10.0, 10.0, 10.0), "hr")
    sr = ArrayVolume(hr.array[4::8].copy(), (80.0, 10.0, 10.0), "sr")
    opts = ev.EvalOptions(metrics={"psnr", "morph"}, quiet=True)
    res = ev.evaluate_volume(sr, hr, opts, label="model")
    assert res.summary["morphometry"] is not None
    morph = [d for d in descs if d.startswith("morphometry")]
    assert morph == ["morphometry HR: Tb.Th", "morphometry HR: Tb.Sp",
                     "morphometry model: Tb.Th", "morphometry model: Tb.Sp"]


def _one_page_per_write(path: Path, pages: list[np.ndarray]) -> None:
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for p in pages:
            tw.write(p, photometric="minisblack")  # one tifffile series per page


def test_tiff_of_one_series_per_page_opens_without_pairwise_matching(tmp_path, monkeypatch):
    """A TIFF written one slice per write (a common export loop) was opened through tifffile's
    shaped series: one per page, compared pairwise as pyramid levels (0.45 s to open 1000 pages,
    4.1 s for 4000, at every ``evaluate`` and ``info``). Now the pages open as one stack."""
    import tifffile.tifffile as tt

    from microct_sr.volume import open_volume

    sizes: list[int] = []
    real = tt.pyramidize_series

    def spy(series, *args, **kw):
        sizes.append(len(series))
        return real(series, *args, **kw)

    monkeypatch.setattr(tt, "pyramidize_series", spy)
    a = (np.arange(60 * 16 * 16) % 251).astype(np.uint8).reshape(60, 16, 16)
    _one_page_per_write(tmp_path / "p.tif", list(a))
    with open_volume(tmp_path / "p.tif", spacing_um=(10.0, 10.0, 10.0)) as v:
        assert v.shape == (60, 16, 16)
        np.testing.assert_array_equal(v.read(0, 60), a)
        np.testing.assert_array_equal(v[37], a[37])
    assert max(sizes, default=0) <= 1


@pytest.mark.parametrize("odd", ["size", "dtype"])
def test_tiff_of_one_series_per_page_with_an_odd_page_is_refused(tmp_path, odd):
    from microct_sr.errors import UserError
    from microct_sr.volume import open_volume

    pages = [np.full((8, 8), i, np.uint8) for i in range(20)]
    pages[10] = np.zeros((8, 9), np.uint8) if odd == "size" else np.zeros((8, 8), np.uint16)
    _one_page_per_write(tmp_path / "m.tif", pages)
    with pytest.raises(UserError, match="pages of different sizes or types"):
        open_volume(tmp_path / "m.tif")


def test_per_slice_psnr_and_ssim_on_threads_stay_in_slice_order(monkeypatch):
    """PSNR/SSIM run on worker threads while the next slices are read: every slice's values
    must land in its own row and in slice order, the same as on one thread."""
    rng = np.random.default_rng(5)
    hr = rng.integers(0, 255, (8 * 9, 48, 48)).astype(np.uint8)
    noise = [rng.normal(0, 2 + 6 * k, (48, 48)) for k in range(9)]  # worse slice by slice
    sr = np.stack([np.clip(hr[8 * k + 4] + n, 0, 255) for k, n in enumerate(noise)])
    opts = ev.EvalOptions(metrics={"psnr", "ssim"}, quiet=True)
    runs = {}
    for threads in (1, 3):
        monkeypatch.setattr(ev, "FIDELITY_THREADS", threads)
        monkeypatch.setattr(ev, "usable_cores", lambda: 4)
        res = ev.evaluate_volume(ArrayVolume(sr.astype(np.uint8), (80.0, 10.0, 10.0)),
                                 ArrayVolume(hr, (10.0, 10.0, 10.0)), opts, label="m")
        runs[threads] = [(r["sr_slice"], r["psnr"], r["ssim"]) for r in res.rows]
        assert res.values["psnr"] == [r["psnr"] for r in res.rows]
    assert runs[1] == runs[3]
    psnr = [p for _, p, _ in runs[3]]
    assert [k for k, _, _ in runs[3]] == list(range(9)) and psnr == sorted(psnr, reverse=True)
