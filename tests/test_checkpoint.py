"""Model files: round trip, and every kind of bad file gives a UserError naming it."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from microct_sr import checkpoint
from microct_sr.checkpoint import DEFAULT_MODEL, load_checkpoint, load_model, save_model
from microct_sr.errors import UserError
from microct_sr.models import build_model, preset

INTENSITY = {"window": [0, 255], "dtype": "uint8"}
PROVENANCE = {"stage": "test", "iterations": 0, "data": "random init inside a test"}


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    torch.manual_seed(1)
    cfg = preset("r2rcan", "tiny")
    return save_model(tmp_path / "m.pt", build_model(cfg), cfg, intensity=INTENSITY,
                      provenance=PROVENANCE, extra={"ema": True})


def test_round_trip_rebuilds_same_network(tiny_file):
    torch.manual_seed(1)
    ref = build_model(preset("r2rcan", "tiny")).eval()
    model, ckpt = load_model(tiny_file)
    assert not model.training
    x = torch.rand(1, 1, 5, 6)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert ckpt["format"] == "microct-sr" and ckpt["format_version"] == 1
    assert ckpt["intensity"] == {"window": [0.0, 255.0], "dtype": "uint8"}
    assert ckpt["provenance"]["stage"] == "test" and ckpt["provenance"]["created"]
    assert ckpt["ema"] is True and ckpt["config"]["arch"] == "r2rcan"


def test_round_trip_keeps_a_16_bit_intensity_window(tmp_path):
    """The window and dtype given to save_model are what the file holds and what load_model
    returns (as floats), for a 16-bit model whose window is not 8-bit's [0, 255]."""
    cfg = preset("r2rcan", "tiny")
    path = save_model(tmp_path / "m16.pt", build_model(cfg), cfg,
                      intensity={"window": [1000, 26500], "dtype": "uint16"},
                      provenance=PROVENANCE)
    want = {"window": [1000.0, 26500.0], "dtype": "uint16"}
    assert torch.load(path, weights_only=True)["intensity"] == want
    assert load_model(path)[1]["intensity"] == want


def test_save_is_atomic_leaves_no_temp(tiny_file, monkeypatch):
    """A save that dies half-way through torch.save (disk full, kill) leaves the previous
    model file at that path byte for byte and no temporary file in the folder; the error
    reaches the caller."""
    assert [p.name for p in tiny_file.parent.iterdir()] == ["m.pt"]
    before = tiny_file.read_bytes()
    real_save, written = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        written.append(f.write(buf.getvalue()[: len(buf.getvalue()) // 2]))
        f.flush()
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    torch.manual_seed(2)  # other weights: a finished write would change the file
    cfg = preset("r2rcan", "tiny")
    with pytest.raises(OSError, match="No space left"):
        save_model(tiny_file, build_model(cfg), cfg, intensity=INTENSITY, provenance=PROVENANCE)
    assert written and written[0] > 0  # part of the new file did reach the disk
    assert tiny_file.read_bytes() == before
    assert [p.name for p in tiny_file.parent.iterdir()] == ["m.pt"]


def test_default_model_path_is_repo_weights(monkeypatch, tmp_path):
    assert DEFAULT_MODEL == Path(checkpoint.__file__).resolve().parents[1] / "weights/default.pt"
    monkeypatch.setenv("MICROCT_SR_DEFAULT_MODEL", str(tmp_path / "x.pt"))
    assert checkpoint.default_model_path() == tmp_path / "x.pt"


def test_default_model_found_in_a_wheel_install_data_dir(monkeypatch, tmp_path):
    """A non-editable install has no checkout: the wheel's data file under the prefix counts."""
    monkeypatch.delenv("MICROCT_SR_DEFAULT_MODEL", raising=False)
    missing_checkout = tmp_path / "site-packages" / "weights" / "default.pt"
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", missing_checkout)
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    monkeypatch.setattr("site.USER_BASE", str(tmp_path / "user"))
    assert checkpoint.default_model_path() == missing_checkout  # nothing anywhere: name it
    user = tmp_path / "user" / checkpoint.SHARE_SUBPATH
    user.parent.mkdir(parents=True)
    user.write_bytes(b"x")
    assert checkpoint.default_model_path() == user
    prefix = tmp_path / "venv" / checkpoint.SHARE_SUBPATH
    prefix.parent.mkdir(parents=True)
    prefix.write_bytes(b"x")
    assert checkpoint.default_model_path() == prefix  # the interpreter's prefix first


def _expect_user_error(path: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    _expect_user_error(tmp_path / "nope.pt", "not found")


def test_truncated_file(tiny_file, tmp_path):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    _expect_user_error(bad, "truncated")


def test_not_a_torch_file(tmp_path):
    bad = tmp_path / "text.pt"
    bad.write_text("hello, I am not a model\n")
    _expect_user_error(bad, "not a readable PyTorch")


class _Boom:
    """An object whose unpickling would run code: loading must refuse it, not run it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_with_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    torch.save({"format": "microct-sr", "payload": _Boom()}, bad)
    _expect_user_error(bad, "refusing to unpickle")
    assert not (tmp_path / "PWNED").exists()


def test_plain_state_dict_is_not_ours(tmp_path):
    bad = tmp_path / "sd.pt"
    torch.save(build_model(preset("r2rcan", "tiny")).state_dict(), bad)
    _expect_user_error(bad, "not a microct-sr model")


def test_newer_format_version(tiny_file, tmp_path):
    ckpt = torch.load(tiny_file, weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, tmp_path / "new.pt")
    _expect_user_error(tmp_path / "new.pt", "format version 99 is not supported")


def test_unknown_config_key_is_incompatible(tiny_file, tmp_path):
    ckpt = torch.load(tiny_file, weights_only=True)
    ckpt["config"]["wormholes"] = 3
    torch.save(ckpt, tmp_path / "cfg.pt")
    _expect_user_error(tmp_path / "cfg.pt", "incompatible")


def test_weights_not_matching_config(tiny_file, tmp_path):
    ckpt = torch.load(tiny_file, weights_only=True)
    ckpt["config"]["n_feats"] = 32
    torch.save(ckpt, tmp_path / "mismatch.pt")
    _expect_user_error(tmp_path / "mismatch.pt", "do not fit")


def test_non_finite_weights_are_refused(tiny_file, tmp_path):
    """A diverged run's weights would write an all-zero volume with exit 0: refused by name."""
    ckpt = torch.load(tiny_file, weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][name][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    _expect_user_error(tmp_path / "nan.pt", rf"hold NaN or Inf values \(first: {name}\)")


def test_missing_intensity(tiny_file, tmp_path):
    ckpt = torch.load(tiny_file, weights_only=True)
    del ckpt["intensity"]
    torch.save(ckpt, tmp_path / "noint.pt")
    _expect_user_error(tmp_path / "noint.pt", "lacks intensity")


def test_load_checkpoint_zip_without_pickle(tmp_path):
    bad = tmp_path / "zip.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/readme.txt", "no data.pkl here")
    with pytest.raises(UserError, match="not a readable PyTorch"):
        load_checkpoint(bad)


def test_save_rejects_bad_intensity(tmp_path):
    cfg = preset("r2rcan", "tiny")
    with pytest.raises(ValueError, match="empty"):
        save_model(tmp_path / "x.pt", build_model(cfg), cfg,
                   intensity={"window": [5, 5], "dtype": "uint8"}, provenance={})
    assert not list(tmp_path.iterdir())


def test_pickle_error_type_is_what_torch_raises(tmp_path):
    """Guards the except clause: weights_only refusals are UnpicklingError."""
    p = tmp_path / "obj.pt"
    torch.save({"x": _Boom()}, p)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, weights_only=True)


def test_a_run_folder_given_as_model_names_its_model_file(tiny_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(tiny_file.read_bytes())
    with pytest.raises(UserError, match=r"run folder, not a model file: pass .*run/model\.pt"):
        load_checkpoint(run)
    with pytest.raises(UserError, match="not a file"):
        load_checkpoint(tmp_path)
