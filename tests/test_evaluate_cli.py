"""`microct-sr evaluate`: both forms, JSON keys, grid convention, outputs and every bad input."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from scipy import ndimage
from tifffile import imread

from microct_sr.metrics import fidelity, perceptual
from microct_sr.volume import write_volume

KEYS = ["n_slices", "psnr", "ssim", "niqe", "ma", "pi", "morphometry", "notes"]
MORPH_KEYS = {"bv_tv", "tb_th_um", "tb_sp_um", "tb_n_per_mm"}


def bone_like(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Trabecular-looking uint8 volume: thresholded smooth noise, bone ~200, marrow ~60."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    bone = field > np.quantile(field, 0.75)
    img = np.where(bone, 200.0, 60.0) + rng.normal(0, 6, shape)
    return np.clip(ndimage.gaussian_filter(img, 0.7), 0, 255).astype(np.uint8)


def noisy(a: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(a.dtype)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    hr = bone_like((32, 128, 128))
    lr = np.rint(hr.reshape(4, 8, 16, 8, 16, 8).mean(axis=(1, 3, 5))).astype(np.uint8)
    files = {
        "hr": write_volume(d / "hr.tif", hr, (10.0, 10.0, 10.0)),
        "lr": write_volume(d / "lr.tif", lr, (80.0, 80.0, 80.0)),
        "good": write_volume(d / "good.tif", noisy(hr[4::8], 4, 1), (80.0, 10.0, 10.0)),
        "bad": write_volume(d / "bad.tif", noisy(hr[4::8], 30, 2), (80.0, 10.0, 10.0)),
        "same": write_volume(d / "same.tif", noisy(hr, 4, 3), (10.0, 10.0, 10.0)),
    }
    return d, hr, files


@pytest.fixture(autouse=True)
def no_iqa_weights(tmp_path, monkeypatch):
    """No parameter file anywhere unless a test passes --iqa-weights: never a download."""
    monkeypatch.delenv(perceptual.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def run_json(run_cli, *args):
    r = run_cli("evaluate", *args, "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def expected_psnr(sr: np.ndarray, hr_slices: np.ndarray, border: int = 4) -> list[float]:
    b = slice(border, -border)
    return [fidelity.psnr(s[b, b].astype(float), h[b, b].astype(float))
            for s, h in zip(sr, hr_slices)]


def test_single_form_json_grid_and_values(run_cli, data):
    d, hr, f = data
    out = run_json(run_cli, f["good"], f["hr"])
    assert list(out) == KEYS
    assert out["n_slices"] == 4
    want = expected_psnr(imread(f["good"]), hr[4::8])  # SR slice k <-> HR slice 8k+4
    assert out["psnr"]["mean"] == pytest.approx(np.mean(want), abs=1e-9)
    assert out["psnr"]["std"] == pytest.approx(np.std(want), abs=1e-9)
    assert 0.5 < out["ssim"]["mean"] < 1
    assert out["niqe"] is None and out["ma"] is None and out["pi"] is None
    assert any("8k+4" in n for n in out["notes"])
    why = perceptual.NIQE_FILE if perceptual.pyiqa_available() else "pyiqa is not installed"
    assert any(why in n for n in out["notes"])
    m = out["morphometry"]
    assert set(m) == MORPH_KEYS and set(m["bv_tv"]) == {"sr", "hr", "rel_error"}
    assert abs(m["bv_tv"]["rel_error"]) < 0.05 and abs(m["tb_th_um"]["rel_error"]) < 0.1
    assert m["tb_th_um"]["hr"] > 20  # physical units (10 um voxels), not voxels


def test_metric_subset_slices_and_csv(run_cli, data, tmp_path):
    d, hr, f = data
    out_csv = tmp_path / "slices.csv"
    out = run_json(run_cli, f["good"], f["hr"], "--metrics", "psnr", "--slices", "1:3",
                   "--csv", out_csv)
    assert out["n_slices"] == 2 and out["ssim"] is None and out["morphometry"] is None
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["sr_slice"], r["hr_slice_start"]) for r in rows] == [("1", "12"), ("2", "20")]
    assert float(rows[0]["psnr"]) > 30


def test_hr_slab_mean_mode_and_equal_shapes(run_cli, data):
    d, hr, f = data
    mid = run_json(run_cli, f["good"], f["hr"], "--metrics", "psnr")
    mean = run_json(run_cli, f["good"], f["hr"], "--metrics", "psnr", "--hr-slice", "mean")
    assert mean["psnr"]["mean"] < mid["psnr"]["mean"]
    assert any("mean of HR slices" in n for n in mean["notes"])
    same = run_json(run_cli, f["same"], f["hr"], "--metrics", "psnr,ssim")
    assert same["n_slices"] == 32 and same["psnr"]["mean"] > 30
    assert any("same slice count" in n for n in same["notes"])


@pytest.mark.parametrize("n_hr,mode,n_compared", [(28, "middle", 3), (29, "middle", 4),
                                                   (29, "mean", 3)])
def test_lr_grid_rounded_up_compares_slices_with_an_hr_slice(run_cli, data, tmp_path, n_hr,
                                                             mode, n_compared):
    """simulate rounds the LR slice count up (28 HR slices -> 4 LR slices): SR slice 3 has
    HR slice 8*3+4 = 28 only when HR has 29 slices, its full slab never; the rest is compared
    and the left-out slice is noted (once exit 2: "fits neither")."""
    _, hr, f = data
    short = write_volume(tmp_path / "hr_short.tif", hr[:n_hr], (10.0, 10.0, 10.0))
    out = run_json(run_cli, "--hr", short, "--sr", f"Good={f['good']}", "--bicubic", "--lr",
                   f["lr"], "--metrics", "psnr,morph", "--hr-slice", mode)
    assert [o["n_slices"] for o in out] == [n_compared, n_compared]
    if mode == "middle":
        want = expected_psnr(imread(f["good"])[:n_compared], hr[4::8][:n_compared])
        assert out[0]["psnr"]["mean"] == pytest.approx(np.mean(want), abs=1e-9)
    left_out = [n for n in out[0]["notes"] if "left out" in n]
    assert (n_compared == 4) != bool(left_out)
    assert all("SR slice 3 left out" in n and f"HR has {n_hr} slices" in n for n in left_out)
    assert out[0]["morphometry"]["bv_tv"]["hr"] == out[1]["morphometry"]["bv_tv"]["hr"]


def test_16_bit_rule(run_cli, data, tmp_path):
    d, hr, f = data
    hr16 = hr.astype(np.uint16) * 100 + 1000
    sr16 = noisy(hr[4::8], 4, 1).astype(np.uint16) * 100 + 1000
    write_volume(tmp_path / "hr16.tif", hr16, (10.0, 10.0, 10.0))
    write_volume(tmp_path / "sr16.tif", sr16, (80.0, 10.0, 10.0))
    out = run_json(run_cli, tmp_path / "sr16.tif", tmp_path / "hr16.tif", "--metrics", "psnr")
    lo, hi = float(hr16[4::8].min()), float(hr16[4::8].max())
    b = slice(4, -4)
    want = [fidelity.psnr(fidelity.to_255(s[b, b], (lo, hi)), fidelity.to_255(h[b, b], (lo, hi)))
            for s, h in zip(sr16, hr16[4::8])]
    assert out["psnr"]["mean"] == pytest.approx(np.mean(want), abs=1e-9)
    assert any("uint16" in n and f"[{lo:g}, {hi:g}]" in n for n in out["notes"])


def test_comparison_form_with_bicubic_table_plot_csv(run_cli, data, tmp_path):
    d, hr, f = data
    table, plot, sheet = tmp_path / "t.md", tmp_path / "p.png", tmp_path / "s.csv"
    out = run_json(run_cli, "--hr", f["hr"], "--sr", f"Good={f['good']}", "--sr",
                   f"Bad={f['bad']}", "--bicubic", "--lr", f["lr"], "--table", table,
                   "--plot", plot, "--csv", sheet, "--metrics", "psnr,ssim,morph")
    assert [o["label"] for o in out] == ["Good", "Bad", "Bicubic"]
    assert all(list(o)[1:] == KEYS for o in out)
    good, bad, bic = (o["psnr"]["mean"] for o in out)
    assert good > bad and good > bic
    assert out[0]["morphometry"]["bv_tv"]["hr"] == out[2]["morphometry"]["bv_tv"]["hr"]
    assert any("align_corners=False" in n for n in out[2]["notes"])
    lines = table.read_text(encoding="utf-8").splitlines()
    # NIQE/Ma/PI were not asked for: their columns (n/a in every row) are named, not shown
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Method", "Scale", "PSNR (dB)", "SSIM", "BV/TV err", "Tb.Th err"]
    assert len(lines) == 7 and lines[-1] == "Not computed: NIQE, Ma, PI."
    assert "n/a" not in "".join(lines[2:5])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(sheet.open()))) == 12
    r = run_cli("evaluate", "--hr", f["hr"], "--sr", f"Good={f['good']}", "--metrics", "psnr",
                "--quiet", "--table", table)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = run_cli("evaluate", "--hr", f["hr"], "--sr", f"Good={f['good']}", "--metrics", "psnr",
                "--quiet")
    assert r.exit_code == 0 and "| Good" in r.stdout and "8k+4" in r.stdout


def test_bicubic_row_scores_an_independent_bicubic_upscale(run_cli, data):
    """The Bicubic row is the documented baseline: OpenCV's INTER_CUBIC (Keys a = -0.75, pixel
    centres at +0.5, i.e. torch's align_corners=False) 8x upscale of each LR slice, rounded
    to uint8, scored by Eq. 8 on 0-255 against HR slice 8k+4 less a 4-pixel border. An
    align_corners=True, bilinear or nearest baseline is 0.6-0.9 dB away on these data."""
    import cv2

    _, hr, f = data
    lr = imread(f["lr"])
    n, h, w = hr.shape[0] // 8, hr.shape[1], hr.shape[2]
    psnrs = []
    for k in range(n):
        up = cv2.resize(lr[k].astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        up = np.clip(np.rint(up), 0, 255)
        d = (up - hr[8 * k + 4].astype(np.float64))[4:-4, 4:-4]
        psnrs.append(10 * math.log10(255.0 ** 2 / np.mean(d * d)))
    out = run_json(run_cli, "--hr", f["hr"], "--sr", f"Good={f['good']}", "--bicubic", "--lr",
                   f["lr"], "--metrics", "psnr")
    bic = next(o for o in out if o["label"] == "Bicubic")
    assert bic["n_slices"] == n
    assert bic["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert bic["psnr"]["std"] == pytest.approx(np.std(psnrs), abs=1e-3)


@pytest.mark.iqa
def test_niqe_with_local_weights_and_ma_pi_null(run_cli, data, shared_data):
    if not perceptual.pyiqa_available():
        pytest.skip("pyiqa is not installed (extra microct-sr[iqa])")
    if not (shared_data / "iqa" / perceptual.NIQE_FILE).is_file():
        pytest.skip("NIQE parameter file absent from ../shared/data/iqa")
    d, hr, f = data
    out = run_json(run_cli, f["good"], f["hr"], "--metrics", "niqe,ma,pi",
                   "--iqa-weights", shared_data / "iqa", "--perceptual-sample", "2")
    assert 0 < out["niqe"]["mean"] < 100 and math.isfinite(out["niqe"]["std"])
    assert out["ma"] is None and out["pi"] is None
    assert any(perceptual.NRQM_FILE in n and "null" in n for n in out["notes"])
    assert any("2 crops of 120x120" in n for n in out["notes"])


@pytest.fixture(scope="module")
def bad_files(data):
    d, hr, f = data
    write_volume(d / "narrow.tif", hr[4::8, :100, :100], (80.0, 10.0, 10.0))
    write_volume(d / "five.tif", hr[:5], (80.0, 10.0, 10.0))
    write_volume(d / "hr3.tif", hr[:3], (10.0, 10.0, 10.0))  # no HR slice 4 for SR slice 0
    write_volume(d / "one.tif", hr[4:5], (80.0, 10.0, 10.0))
    write_volume(d / "bicubic.tif", hr[4::8], (80.0, 10.0, 10.0))  # stem = the --bicubic label
    nan = hr[4::8].astype(np.float32)
    nan[2, 5, 5] = np.nan
    write_volume(d / "nan.tif", nan, (80.0, 10.0, 10.0))
    write_volume(d / "sr_float.tif", hr[4::8].astype(np.float32), (80.0, 10.0, 10.0))
    write_volume(d / "hr_float.tif", hr.astype(np.float32), (10.0, 10.0, 10.0))
    hr_inf = hr.astype(np.float32)
    hr_inf[12, 0, 0] = np.inf
    write_volume(d / "hr_inf.tif", hr_inf, (10.0, 10.0, 10.0))
    write_volume(d / "u16.tif", hr[4::8].astype(np.uint16), (80.0, 10.0, 10.0))
    (d / "empty.tif").write_bytes(b"")
    return d


@pytest.mark.parametrize("args,message", [
    (["{d}/narrow.tif", "{d}/hr.tif"], "in-plane size"),
    (["{d}/five.tif", "{d}/hr.tif"], "slice count"),
    (["{d}/hr.tif", "{d}/good.tif"], "HR has the SR's LR grid: are HR and SR swapped?"),
    (["{d}/one.tif", "{d}/hr3.tif"], "no selected SR slice (--slices) has its HR slice"),
    (["{d}/nan.tif", "{d}/hr_float.tif"], "NaN or Inf"),
    (["{d}/sr_float.tif", "{d}/hr_inf.tif"], "NaN or Inf"),
    (["{d}/empty.tif", "{d}/hr.tif"], "empty"),
    (["{d}/u16.tif", "{d}/hr.tif"], "dtype"),
    (["{d}/good.tif", "{d}/hr.tif", "--metrics", "psnr,lpips"], "unknown metric"),
    (["{d}/good.tif", "{d}/hr.tif", "--iqa-weights", "{d}/no_such_dir"], "weights folder"),
    (["{d}/good.tif", "{d}/hr.tif", "--slices", "3:1"], "selects no slice"),
    (["{d}/good.tif", "{d}/hr.tif", "--crop-border", "64"], "--crop-border 64 leaves nothing"),
    (["{d}/good.tif", "{d}/hr.tif", "--metrics", "psnr,ssim", "--crop-border", "59"],
     "--crop-border 59 leaves 10x10 px of 128x128 slices, smaller than SSIM's 11x11 window"),
    (["{d}/good.tif", "{d}/hr.tif", "--slices", "x"], "A:B"),
    (["{d}/good.tif", "{d}/hr.tif", "--bicubic"], "--lr"),
    (["{d}/good.tif", "{d}/hr.tif", "--hr", "{d}/hr.tif"], "not both"),
    (["--hr", "{d}/hr.tif", "--sr", "nameonly"], "NAME=PATH"),
    (["--hr", "{d}/hr.tif", "--sr", "A={d}/good.tif", "--sr", "a={d}/bad.tif"],
     "two methods are labelled 'A' and 'a'"),
    (["--hr", "{d}/hr.tif", "--sr", "Bicubic={d}/good.tif", "--bicubic", "--lr", "{d}/lr.tif"],
     "two methods are labelled 'Bicubic' twice"),
    (["{d}/bicubic.tif", "{d}/hr.tif", "--bicubic", "--lr", "{d}/lr.tif"],
     "labelled 'bicubic' and 'Bicubic'"),
    (["{d}/good.tif", "{d}/missing.tif"], "no such file"),
    (["{d}/good.tif", "{d}/hr.tif", "--csv", "{d}/no_dir/x.csv"], "output folder"),
])
def test_bad_input_exits_2(run_cli, bad_files, args, message):
    d = bad_files
    r = run_cli("evaluate", *[a.format(d=d) for a in args], "--quiet")
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert message in r.stderr


def test_pipe_in_a_label_is_escaped_in_the_markdown_table(run_cli, data, tmp_path):
    f = data[2]
    table = tmp_path / "t.md"
    out = run_json(run_cli, "--hr", f["hr"], "--sr", f"R2RCAN|GAN={f['good']}", "--sr",
                   f"Bad={f['bad']}", "--metrics", "psnr", "--table", table)
    assert out[0]["label"] == "R2RCAN|GAN"  # JSON keeps the label as given
    lines = table.read_text(encoding="utf-8").splitlines()[:4]
    assert lines[2].startswith(r"| R2RCAN\|GAN ")
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines]
    assert len(set(cells)) == 1  # every row has the header's column count


def test_crop_border_leaving_less_than_ssims_window_is_fine_without_ssim(run_cli, data):
    _, hr, f = data
    out = run_json(run_cli, f["good"], f["hr"], "--metrics", "psnr", "--crop-border", "59")
    assert out["ssim"] is None
    want = expected_psnr(imread(f["good"]), hr[4::8], border=59)
    assert out["psnr"]["mean"] == pytest.approx(np.mean(want), abs=1e-9)


def test_unsupported_plot_suffix_exits_2_before_any_metric(run_cli, data, tmp_path,
                                                           monkeypatch):
    from microct_sr.metrics import evaluate

    f = data[2]
    monkeypatch.setattr(evaluate, "evaluate_files", lambda *a, **k: pytest.fail("computed"))
    r = run_cli("evaluate", f["good"], f["hr"], "--plot", tmp_path / "x.bmp", "--quiet")
    assert r.exit_code == 2, r.stderr
    assert "'--plot'" in r.stderr and "x.bmp" in r.stderr and ".png, .pdf, .svg" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--csv", "--table", "--plot"])
def test_report_over_an_input_is_refused_even_with_overwrite(run_cli, data, tmp_path, option):
    """--csv hr.tif --overwrite once replaced the HR volume with a CSV."""
    f = data[2]
    hr_copy = tmp_path / "hr.svg" if option == "--plot" else tmp_path / "hr.tif"
    hr_copy.write_bytes(f["hr"].read_bytes())
    r = run_cli("evaluate", "--hr", hr_copy, "--sr", f"sr={f['good']}", option, hr_copy,
                "--overwrite", "--quiet", "--metrics", "psnr")
    assert r.exit_code == 2, r.stderr
    assert f"{option} is the input" in r.stderr and str(hr_copy) in r.stderr
    assert hr_copy.read_bytes() == f["hr"].read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [hr_copy.name]


def test_report_over_a_slice_of_a_folder_input_is_refused(run_cli, data, tmp_path):
    """An HR given as a slice folder: a report named like one of its slices is refused even
    with --overwrite (the folder itself is no output); a new name inside the folder is fine."""
    from microct_sr.volume import open_volume, write_volume

    f = data[2]
    with open_volume(f["hr"]) as v:
        folder = write_volume(tmp_path / "hrdir", v[:], v.spacing_um)
    slice_file = sorted(folder.glob("*.bmp"))[1]
    before = slice_file.read_bytes()
    args = ("evaluate", "--hr", folder, "--sr", f"sr={f['good']}", "--overwrite", "--quiet",
            "--metrics", "psnr")
    r = run_cli(*args, "--csv", slice_file)
    assert r.exit_code == 2 and "--csv is the input" in r.stderr and slice_file.name in r.stderr
    assert slice_file.read_bytes() == before
    r = run_cli(*args, "--csv", folder / "scores.csv")
    assert r.exit_code == 0, r.stderr
    assert (folder / "scores.csv").read_text().startswith("label")


def test_missing_pyiqa_when_asked_by_name_exits_2(run_cli, data, monkeypatch):
    d, hr, f = data
    monkeypatch.setattr(perceptual, "pyiqa_available", lambda: False)
    r = run_cli("evaluate", f["good"], f["hr"], "--metrics", "niqe", "--quiet")
    assert r.exit_code == 2 and "microct-sr[iqa]" in r.stderr
    out = run_json(run_cli, f["good"], f["hr"], "--metrics", "psnr")
    assert out["niqe"] is None and out["psnr"] is not None
    default = run_json(run_cli, f["good"], f["hr"], "--slices", "0:1")
    assert default["niqe"] is None and any("pyiqa is not installed" in n for n in default["notes"])


def test_large_volumes_get_morphometry_on_a_central_window(run_cli, data, monkeypatch):
    from microct_sr.metrics import evaluate as metrics

    d, hr, f = data
    monkeypatch.setattr(metrics, "MORPH_MAX_VOXELS", 4 * 64 * 64)
    assert metrics.morph_voi(4, 128, 128) == (32, 96, 32, 96)
    out = run_json(run_cli, f["good"], f["hr"], "--metrics", "morph")
    assert any("central 64x64 px" in n for n in out["notes"])
    assert abs(out["morphometry"]["bv_tv"]["rel_error"]) < 0.1


def test_unknown_spacing_skips_morphometry_unless_given(run_cli, data, tmp_path):
    d, hr, f = data
    write_volume(tmp_path / "hr_nospacing.tif", hr, None)
    out = run_json(run_cli, f["good"], tmp_path / "hr_nospacing.tif", "--metrics", "morph")
    assert out["morphometry"] is None and any("--spacing-um" in n for n in out["notes"])
    out = run_json(run_cli, f["good"], tmp_path / "hr_nospacing.tif", "--metrics", "morph",
                   "--spacing-um", "20")
    assert out["morphometry"]["tb_th_um"]["hr"] == pytest.approx(
        2 * run_json(run_cli, f["good"], f["hr"], "--metrics", "morph")
        ["morphometry"]["tb_th_um"]["hr"])


@pytest.mark.iqa
def test_slices_too_small_for_niqe(run_cli, data, shared_data, tmp_path):
    if not perceptual.pyiqa_available():
        pytest.skip("pyiqa is not installed (extra microct-sr[iqa])")
    d, hr, f = data
    write_volume(tmp_path / "hr64.tif", hr[:, :64, :64], (10.0, 10.0, 10.0))
    write_volume(tmp_path / "sr64.tif", hr[4::8, :64, :64], (80.0, 10.0, 10.0))
    args = (tmp_path / "sr64.tif", tmp_path / "hr64.tif", "--iqa-weights", shared_data / "iqa")
    out = run_json(run_cli, *args)
    assert out["niqe"] is None and any("smaller than the 96x96" in n for n in out["notes"])
    assert out["psnr"] is None  # identical slices: PSNR = inf everywhere, noted
    assert any("not finite" in n for n in out["notes"])
    r = run_cli("evaluate", *args, "--metrics", "niqe", "--quiet")
    assert r.exit_code == 2 and "96x96" in r.stderr


def test_scores_of_unaligned_grids_come_with_a_warning(run_cli, data, tmp_path):
    """A method far below bicubic (here: a volume of another sample) and an LR scan that
    `simulate` made with motion each add a warning to stderr and the notes; a good method on
    an aligned LR scan adds none."""
    d, hr, files = data
    r = run_cli("evaluate", "--hr", files["hr"], "--sr", f"good={files['good']}", "--lr",
                files["lr"], "--bicubic", "--metrics", "psnr", "--json", "--quiet")
    assert r.exit_code == 0 and "below bicubic" not in r.stderr and "motion" not in r.stderr
    other = write_volume(tmp_path / "other.tif", bone_like((4, 128, 128), seed=9),
                         (80.0, 10.0, 10.0))
    moved = tmp_path / "moved"
    moved.mkdir()
    lr = write_volume(moved / "lr.tif", imread(files["lr"]), (80.0, 80.0, 80.0))
    (moved / "simulation.json").write_text(json.dumps({"rotation_deg": 4.5,
                                                        "shift_um": [30.0, -12.0]}))
    r = run_cli("evaluate", "--hr", files["hr"], "--sr", f"other={other}", "--lr", lr,
                "--bicubic", "--metrics", "psnr", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    gap = res[1]["psnr"]["mean"] - res[0]["psnr"]["mean"]
    assert gap > 1
    assert f"other scores {gap:.1f} dB below bicubic" in r.stderr
    assert "simulated with motion (rotation 4.5 deg" in r.stderr
    assert any("below bicubic" in n for n in res[0]["notes"])


def test_table_keeps_a_column_any_method_has_and_names_the_rest():
    from types import SimpleNamespace

    from microct_sr.metrics.report import format_table

    stat = {"mean": 20.0, "std": 1.0}
    results = [SimpleNamespace(label="A", summary={"psnr": stat, "niqe": stat}),
               SimpleNamespace(label="B", summary={"psnr": stat})]
    lines = format_table(results).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == \
        ["Method", "Scale", "PSNR (dB)", "NIQE"]
    assert lines[3].split("|")[4].strip() == "n/a"  # B has no NIQE; A has, so it is shown
    assert lines[-1] == "Not computed: SSIM, Ma, PI, BV/TV err, Tb.Th err."


@pytest.mark.parametrize("option, name", [("--csv", "s.csv"), ("--table", "t.md"),
                                          ("--plot", "p.png")])
def test_report_another_run_finished_meanwhile_is_kept_without_overwrite(
        run_cli, data, tmp_path, monkeypatch, option, name):
    """Two evaluate runs writing the same report: one that appears after this run checked
    its outputs (while the metrics ran) is kept, exit 2 naming it, unless --overwrite."""
    import microct_sr.metrics.evaluate as evaluate

    f = data[2]
    report = tmp_path / name
    real = evaluate.evaluate_files

    def other_run_finishes_meanwhile(*a, **k):
        results = real(*a, **k)
        report.write_text("the other run")
        return results

    monkeypatch.setattr(evaluate, "evaluate_files", other_run_finishes_meanwhile)
    args = ["evaluate", "--hr", f["hr"], "--sr", f"Good={f['good']}", "--metrics", "psnr",
            "--quiet", option, report]
    r = run_cli(*args)
    assert r.exit_code == 2, r.stderr
    assert f"{report}: appeared while this run was writing it" in r.stderr
    assert report.read_text() == "the other run"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert report.read_bytes() != b"the other run"


def test_table_of_every_metric_names_no_column_left_out():
    from types import SimpleNamespace

    from microct_sr.metrics.report import TABLE_HEADER, format_table

    stat = {"mean": 20.0, "std": 1.0}
    morph = {k: {"rel_error": 0.1} for k in ("bv_tv", "tb_th_um")}
    summary = {"psnr": stat, "ssim": stat, "niqe": stat, "ma": stat, "pi": stat,
               "morphometry": morph}
    lines = format_table([SimpleNamespace(label="A", summary=summary)]).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(TABLE_HEADER)
    assert len(lines) == 3 and "Not computed" not in "".join(lines)
