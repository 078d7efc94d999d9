"""Small input files several test modules build: a random model file, a DICOM series, an MHA
with one header line changed."""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from microct_sr.checkpoint import save_model
from microct_sr.models import build_model, preset


def make_model(path: Path, name: str = "tiny", dtype: str = "uint8") -> Path:
    """A randomly initialised model file, made inside the test (never shipped)."""
    torch.manual_seed(0)
    cfg = preset("r2rcan", name)
    hi = 255 if dtype == "uint8" else 65535
    return save_model(path, build_model(cfg), cfg, intensity={"window": [0, hi], "dtype": dtype},
                      provenance={"stage": "test", "iterations": 0, "data": "random init"})


class ArrayVolume:
    """An in-memory stand-in for ``volume.Volume``: ``shape``, ``dtype``, ``spacing_um``,
    ``path``, ``read(z0, z1)`` (a copy; every call recorded in ``reads``) and ``[z]``.
    ``fail_at``: reading from that slice on raises OSError (a disk failing mid-scan)."""

    def __init__(self, array: np.ndarray,
                 spacing_um: tuple[float, float, float] | None = (80.0, 80.0, 80.0),
                 path: str | Path = "memory.tif", fail_at: int | None = None):
        self.array, self.spacing_um, self.fail_at = array, spacing_um, fail_at
        self.path = Path(path)
        self.shape, self.dtype = array.shape, array.dtype
        self.reads: list[tuple[int, int]] = []

    def read(self, z0: int, z1: int) -> np.ndarray:
        if self.fail_at is not None and z0 >= self.fail_at:
            raise OSError("disk on fire")
        self.reads.append((z0, z1))
        return self.array[z0:z1].copy()

    def __getitem__(self, z: int) -> np.ndarray:
        return self.read(z, z + 1)[0]


def dicom_series(folder: Path, slices: list[np.ndarray], dz_mm: float = 0.05) -> list[Path]:
    """One DICOM file per slice (pixel 0.02 x 0.03 mm, slices ``dz_mm`` apart), one series."""
    folder.mkdir(exist_ok=True)
    files = []
    for i, s in enumerate(slices):
        img = sitk.GetImageFromArray(s)
        img.SetSpacing((0.02, 0.03))
        img.SetOrigin((0.0, 0.0, dz_mm * i))
        img.SetMetaData("0020|0032", f"0\\0\\{dz_mm * i}")
        img.SetMetaData("0020|0013", str(i + 1))
        img.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        img.SetMetaData("0008|0060", "CT")
        img.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.2")
        img.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{i + 1}")
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        files.append(folder / f"slice{i:03d}.dcm")
        w.SetFileName(str(files[-1]))
        ctype = locale.setlocale(locale.LC_CTYPE)
        w.Execute(img)
        # GDCM's writer leaves LC_CTYPE at "C": later open() calls without an encoding in
        # the same test process would decode UTF-8 files (the evaluate table's "±") as ASCII
        locale.setlocale(locale.LC_CTYPE, ctype)
    return files


def mha_with(tmp_path: Path, name: str, key: str, value: str) -> Path:
    """An MHA (4 x 8 x 8 uint8, 80 um) whose header line ``key = ...`` says ``value``."""
    img = sitk.GetImageFromArray(np.arange(256, dtype=np.uint8).reshape(4, 8, 8))
    img.SetSpacing((0.08, 0.08, 0.08))
    sitk.WriteImage(img, str(tmp_path / "ok.mha"))
    lines = (tmp_path / "ok.mha").read_bytes().split(b"\n")
    lines = [f"{key} = {value}".encode() if ln.startswith(key.encode()) else ln for ln in lines]
    (tmp_path / name).write_bytes(b"\n".join(lines))
    return tmp_path / name
