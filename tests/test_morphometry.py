"""Morphometry on phantoms of known geometry: parallel plates of known thickness and spacing."""

from __future__ import annotations

import numpy as np
import pytest

from microct_sr.metrics import morphometry as morph


def plates(thickness: int, gap: int, axis: int, n_plates: int = 4, side: int = 16) -> np.ndarray:
    """Plates normal to ``axis``: ``thickness`` bone voxels, ``gap`` marrow voxels, repeated;
    half a gap at each end (the array edge acts as a mirror, so every gap measures ``gap``)."""
    period = thickness + gap
    pos = np.arange(n_plates * period)
    line = ((pos - gap // 2) % period) < thickness
    shape = [side, side, side]
    shape[axis] = line.size
    view = [1, 1, 1]
    view[axis] = line.size
    return np.broadcast_to(line.reshape(view), shape).copy()


@pytest.mark.parametrize("thickness,gap", [(5, 9), (4, 10), (3, 6), (7, 12)])
@pytest.mark.parametrize("axis,spacing", [(2, (10.0, 10.0, 10.0)), (0, (80.0, 10.0, 10.0)),
                                          (1, (30.0, 20.0, 10.0))])
def test_plates_thickness_spacing_within_one_voxel(thickness, gap, axis, spacing):
    bone = plates(thickness, gap, axis)
    voxel = spacing[axis]  # voxel size along the plate normal
    m = morph.morphometry(bone, spacing)
    assert abs(m["tb_th_um"] - thickness * voxel) <= voxel + 1e-6
    assert abs(m["tb_sp_um"] - gap * voxel) <= voxel + 1e-6
    true_bvtv = thickness / (thickness + gap)
    assert abs(m["bv_tv"] - true_bvtv) <= 0.02 * true_bvtv
    assert m["tb_n_per_mm"] == pytest.approx(m["bv_tv"] / (m["tb_th_um"] / 1000))


def test_odd_plates_are_exact():
    m = morph.morphometry(plates(5, 9, axis=2), (10.0, 10.0, 10.0))
    assert m["tb_th_um"] == pytest.approx(50.0)


def test_thicker_plates_measure_thicker():
    sp = (10.0, 10.0, 10.0)
    thin = morph.morphometry(plates(3, 9, 2), sp)["tb_th_um"]
    thick = morph.morphometry(plates(9, 9, 2), sp)["tb_th_um"]
    assert thick > 2.5 * thin


def test_local_thickness_is_zero_outside_and_at_least_own_sphere():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    blob = ndimage.gaussian_filter(rng.normal(size=(12, 24, 24)), 2) > 0
    sp = (20.0, 10.0, 10.0)
    lt = morph.local_thickness(blob, sp)
    assert (lt[~blob] == 0).all()
    assert (lt[blob] >= 2 * morph.surface_distance(blob, sp)[blob] - 1e-9).all()


def test_compare_relative_errors_and_undefined_values():
    sr = {"bv_tv": 0.22, "tb_th_um": 90.0, "tb_sp_um": float("nan"), "tb_n_per_mm": 2.0}
    hr = {"bv_tv": 0.20, "tb_th_um": 100.0, "tb_sp_um": 400.0, "tb_n_per_mm": 0.0}
    c = morph.compare(sr, hr)
    assert c["bv_tv"]["rel_error"] == pytest.approx(0.1)
    assert c["tb_th_um"] == {"sr": 90.0, "hr": 100.0, "rel_error": pytest.approx(-0.1)}
    assert c["tb_sp_um"]["sr"] is None and c["tb_sp_um"]["rel_error"] is None
    assert c["tb_n_per_mm"]["rel_error"] is None


def test_otsu_from_histogram_splits_two_modes():
    rng = np.random.default_rng(1)
    vals = np.concatenate([rng.normal(60, 8, 5000), rng.normal(180, 8, 2000)]).clip(0, 255)
    counts = np.bincount(np.rint(vals).astype(int), minlength=256)
    t = morph.otsu_threshold_from_histogram(counts, np.arange(256.0))
    assert 90 < t < 150
    with pytest.raises(ValueError):
        morph.otsu_threshold_from_histogram(np.eye(1, 256, 7, dtype=int)[0], np.arange(256.0))


def test_degenerate_volumes():
    assert morph.local_thickness(np.zeros((3, 4, 4), bool), (1, 1, 1)).max() == 0
    m = morph.morphometry(np.zeros((3, 4, 4), bool), (10, 10, 10))
    assert m["bv_tv"] == 0 and np.isnan(m["tb_th_um"])
    with pytest.raises(ValueError):
        morph.morphometry(np.zeros((0, 4, 4), bool), (10, 10, 10))


def test_local_thickness_is_the_same_on_any_number_of_threads():
    """The radius levels' distance transforms run in parallel threads (scipy releases the
    GIL): the sweep's maximum must not depend on how the levels are spread over threads."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    blob = ndimage.gaussian_filter(rng.random((10, 48, 48)), (0.5, 3, 3)) > 0.5
    sp = (80.0, 10.0, 10.0)
    one = morph.local_thickness(blob, sp, threads=1)
    assert one[blob].min() > 0 and len(np.unique(one[blob])) > 5
    for n in (2, 3, 7):
        np.testing.assert_array_equal(morph.local_thickness(blob, sp, threads=n), one)
