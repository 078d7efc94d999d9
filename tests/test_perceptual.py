"""NIQE via pyiqa on its calibration images, PI formula, Ma/PI null without NRQM, crop sampling."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from microct_sr.errors import UserError
from microct_sr.metrics import perceptual
from test_fidelity import CALIB_IMAGES, _y_channel, published, pyiqa_calibration_dir


def niqe_weights(shared) -> str:
    p = shared / "iqa" / perceptual.NIQE_FILE
    if not p.is_file():
        pytest.skip(f"NIQE parameter file absent: {p}")
    return str(p.parent)


@pytest.fixture(scope="module")
def niqe_scorer():
    from conftest import SHARED_DATA

    if not perceptual.pyiqa_available():
        pytest.skip("pyiqa is not installed (extra microct-sr[iqa])")
    if not (SHARED_DATA / "iqa" / perceptual.NIQE_FILE).is_file():
        pytest.skip(f"NIQE parameter file absent under {SHARED_DATA / 'iqa'}")
    return perceptual.PerceptualScorer({"niqe", "ma", "pi"}, SHARED_DATA / "iqa")


def test_pi_formula_with_given_ma():
    assert perceptual.perceptual_index(niqe=4.0, ma=6.0) == pytest.approx(4.0)
    assert perceptual.perceptual_index(niqe=15.7536, ma=1.3894) == pytest.approx(12.1821)
    # lower NIQE or higher Ma -> better (lower) PI
    assert perceptual.perceptual_index(3.0, 8.0) < perceptual.perceptual_index(5.0, 8.0)
    assert perceptual.perceptual_index(3.0, 9.0) < perceptual.perceptual_index(3.0, 8.0)


@pytest.mark.iqa
@pytest.mark.parametrize("name", CALIB_IMAGES)
def test_niqe_matches_pyiqa_published_values(shared_data, niqe_scorer, name):
    from skimage.io import imread

    d = pyiqa_calibration_dir()
    y = _y_channel(imread(d / "dist_dir" / name))
    ours = niqe_scorer.score(y)["niqe"]
    assert abs(ours - published(shared_data, "calibration_summary.csv", "niqe(ours)")[name]) < 0.01


@pytest.mark.iqa
def test_niqe_equals_pyiqa_own_function(shared_data, niqe_scorer):
    import torch
    from pyiqa.archs.niqe_arch import NIQE
    from skimage.io import imread

    ref = NIQE(pretrained_model_path=str(shared_data / "iqa" / perceptual.NIQE_FILE))
    rgb = imread(pyiqa_calibration_dir() / "dist_dir" / "I19.bmp")
    expected = ref(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255).item()
    assert niqe_scorer.score(_y_channel(rgb))["niqe"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.iqa
def test_ma_and_pi_unavailable_without_nrqm(niqe_scorer):
    assert niqe_scorer.available == {"niqe"}
    assert any(perceptual.NRQM_FILE in n and "null" in n for n in niqe_scorer.notes)
    rng = np.random.default_rng(0)
    scores = niqe_scorer.score(rng.uniform(0, 255, (128, 128)))
    assert set(scores) == {"niqe"} and np.isfinite(scores["niqe"])


def test_no_parameter_file_means_no_metric_and_no_download(tmp_path, monkeypatch):
    monkeypatch.delenv(perceptual.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    s = perceptual.PerceptualScorer({"niqe", "ma", "pi"})
    assert s.available == set()
    assert any(perceptual.NIQE_FILE in n for n in s.notes)
    assert not (tmp_path / "torch").exists()  # nothing fetched, nothing created


def test_weights_folder_resolution(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="IQA weights folder not found"):
        perceptual.weights_search_path(tmp_path / "missing")
    monkeypatch.setenv(perceptual.WEIGHTS_ENV, str(tmp_path))
    assert perceptual.weights_search_path(None) == [tmp_path]
    monkeypatch.setenv(perceptual.WEIGHTS_ENV, str(tmp_path / "nope"))
    with pytest.raises(UserError):
        perceptual.weights_search_path(None)


@pytest.mark.iqa
def test_weights_from_environment_variable(shared_data, tmp_path, monkeypatch):
    if not perceptual.pyiqa_available():
        pytest.skip("pyiqa is not installed (extra microct-sr[iqa])")
    shutil.copy(niqe_weights(shared_data) + "/" + perceptual.NIQE_FILE, tmp_path)
    monkeypatch.setenv(perceptual.WEIGHTS_ENV, str(tmp_path))
    assert perceptual.PerceptualScorer({"niqe"}).available == {"niqe"}


def test_crop_sampling_is_seeded_and_in_bounds():
    a = perceptual.sample_crops(10, 300, 200, 20, 128, seed=5)
    assert a == perceptual.sample_crops(10, 300, 200, 20, 128, seed=5)
    assert a != perceptual.sample_crops(10, 300, 200, 20, 128, seed=6)
    assert len(a) == 20 and [c.z for c in a] == sorted(c.z for c in a)
    for c in a:
        assert 0 <= c.z < 10 and c.size_y == c.size_x == 128
        assert 0 <= c.y0 <= 300 - 128 and 0 <= c.x0 <= 200 - 128
    small = perceptual.sample_crops(2, 100, 120, 3, 256, seed=0)  # 2 whole slices, no repeats
    assert [(c.z, c.size_y, c.size_x, c.y0, c.x0) for c in small] == [(0, 100, 120, 0, 0),
                                                                     (1, 100, 120, 0, 0)]
    many = perceptual.sample_crops(9, 100, 120, 3, 256, seed=0)  # sample of whole slices
    assert len(many) == 3 and all((c.size_y, c.size_x) == (100, 120) for c in many)
    whole = perceptual.sample_crops(4, 100, 120, 0, 256, seed=0)
    assert [c.z for c in whole] == [0, 1, 2, 3]
    groups = list(perceptual.crops_by_slice(a))
    assert sum(len(g) for _, g in groups) == 20


def test_too_small_image_is_an_error():
    s = perceptual.PerceptualScorer(set())
    with pytest.raises(ValueError, match="96"):
        s.score(np.zeros((64, 200)))


@pytest.mark.iqa
def test_scorer_builds_pi_from_niqe_and_a_given_ma(niqe_scorer):
    """With an NRQM that answers Ma = 6.5 (stand-in: the model file is absent offline), PI is
    ((10 - Ma) + NIQE) / 2 of the same image."""
    import copy

    import torch

    s = copy.copy(niqe_scorer)
    s._nrqm = lambda x: torch.tensor(6.5, dtype=torch.float64)
    s.available = {"niqe", "ma", "pi"}
    img = np.random.default_rng(2).uniform(0, 255, (128, 160))
    out = s.score(img)
    assert out["ma"] == 6.5
    assert out["pi"] == pytest.approx(((10 - 6.5) + out["niqe"]) / 2)
    assert out["niqe"] == pytest.approx(niqe_scorer.score(img)["niqe"])
