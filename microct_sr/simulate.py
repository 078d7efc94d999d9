"""Scanner simulation: an HR micro-CT volume -> the LR scan a micro-CT scanner would give.

Per LR slice (see docs/simulate.md for the full model and the conventions):

1. average the ``factor`` HR slices the LR slice covers (LR slice k <- HR slices [fk, fk+f));
2. map gray values to linear attenuation: ``mu = mu_hi * max(g - lo, 0) / (hi - lo)`` with the
   gray window ``(lo, hi)`` and ``mu_hi = attenuation_per_cm`` (1/cm) at the window's top;
3. pad the field by ``edge_pad`` LR pixels repeating its edge (the object goes on beyond it);
4. rigid in-plane motion of the object (rotation about the centre of the field, then shift),
   applied inside the projector;
5. parallel-beam forward projection over 360 degrees with ``views`` equally spaced views
   (ray-driven, bilinear sampling, at a projection pitch of ``proj_pitch`` HR pixels);
6. detector binning: ``factor`` HR-pitch detector pixels -> one LR detector pixel by averaging
   the transmitted intensity ``exp(-p)`` (not the line integrals);
7. Poisson noise with ``photons`` counts per LR detector pixel per view for the open beam, -log;
8. filtered back-projection (ramp filter times the chosen window) onto the LR grid, crop the
   padding;
9. Gaussian smoothing (``smoothing`` LR pixels), back to gray values with the same window.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .atomic import atomic_write, publish
from .errors import UserError
from .volume.base import finite_slices

log = logging.getLogger(__name__)

FILTERS = ("hamming", "shepp-logan", "cosine", "hann", "ramp")

# Default photon count: see docs/simulate.md ("Photon count"). An HR scan at 900 views x 464 ms
# with HR_PHOTONS_PER_PIXEL open-beam counts per 10 um detector pixel per view; the LR scan
# (225 views x 40 ms) bins 8 x 8 such pixels (8 in-plane, 8 slices) per LR detector pixel:
HR_PHOTONS_PER_PIXEL = 3500.0
HR_EXPOSURE_MS, LR_EXPOSURE_MS = 464.0, 40.0
HR_VIEWS, LR_VIEWS = 900, 225
DEFAULT_PHOTONS = HR_PHOTONS_PER_PIXEL * 8 * 8 * LR_EXPOSURE_MS / HR_EXPOSURE_MS  # 19310

PAD_MODE = "edge"             # np.pad mode for edge_pad (edge: tissue stays tissue)
# Upper bounds of the options: beyond them a run means nothing (or cannot be computed).
MAX_PHOTONS = 1e15            # Poisson counts stay far below numpy's limit (~9e18); use inf
MAX_SMOOTHING = 100.0         # LR pixels: wider than any slice worth simulating
MAX_ATTENUATION_PER_CM = 1e4  # above any material at micro-CT energies (lead, 20 keV: ~1e3)
MAX_MU_PER_UM = 1e3           # attenuation is clipped here: a ray through it is opaque anyway
RANDOM_ROTATION_DEG = 10.0     # --random-motion: rotation uniform in [-10, 10] degrees
RANDOM_SHIFT_LR_PX = 3.0       # and each shift component uniform in [-3, 3] LR pixels

CONVENTIONS = (
    "Arrays are (z, y, x); x = column index (increasing to the right), y = row index (increasing "
    "downwards), both in the slice plane. The motion maps an HR point to its LR position: "
    "p_lr = R(rotation_deg) (p_hr - c) + c + shift_um, with p = (x, y) in micrometres from the "
    "corner of the first pixel, c = the centre of the slice field of view (x_size/2, y_size/2) "
    "(HR and LR fields of view are the same physical square), and R(a) = [[cos a, -sin a], "
    "[sin a, cos a]] acting on (x, y): a positive rotation_deg turns +x towards +y, i.e. "
    "CLOCKWISE as displayed with y pointing down. shift_um = [x, y] is applied after the "
    "rotation, in the same (HR = LR) frame: +x moves the object right, +y moves it down. "
    "Undo: p_hr = R(-rotation_deg) (p_lr - c - shift_um) + c. The rotation axis is z; there is "
    "no z motion: LR slice k covers HR slices [factor*k, factor*k + factor) (the last LR slice "
    "averages the HR slices that remain). LR pixel (i, j) covers HR pixels "
    "[factor*i, factor*i+factor) x [factor*j, factor*j+factor) of the motionless object."
)


@dataclass
class SimParams:
    """Parameters of one simulated scan (see the module docstring and docs/simulate.md)."""

    factor: int = 8
    views: int = LR_VIEWS
    photons: float | None = DEFAULT_PHOTONS    # None or inf: noiseless
    smoothing: float = 0.5                      # Gaussian sigma in LR pixels (0: none)
    filter: str = "hamming"
    rotation_deg: float = 0.0
    shift_um: tuple[float, float] = (0.0, 0.0)  # (x, y)
    seed: int = 0
    window: tuple[float, float] | None = None   # gray (lo, hi); None: from the data
    attenuation_per_cm: float = 4.0             # mu at the window's top, 1/cm
    proj_pitch: int = 2                         # forward-projection pitch in HR pixels
    edge_pad: int = 2                           # LR pixels of padding (edge values) around

    def validate(self) -> None:
        """Raise UserError for impossible values."""
        if self.factor < 1:
            raise UserError(f"--factor must be >= 1, got {self.factor}")
        if self.views < 2:
            raise UserError(f"--views must be >= 2, got {self.views}")
        if self.photons is not None and not (self.photons > 0):
            raise UserError(f"--photons must be > 0 (photons per detector pixel per view), "
                            f"got {self.photons}")
        if self.photons is not None and MAX_PHOTONS < self.photons < math.inf:
            raise UserError(f"--photons must be <= {MAX_PHOTONS:g} (or inf for no noise), "
                            f"got {self.photons:g}")
        if not 0 <= self.smoothing <= MAX_SMOOTHING:
            raise UserError(f"--smoothing must be in [0, {MAX_SMOOTHING:g}] LR pixels, "
                            f"got {self.smoothing:g}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.filter not in FILTERS:
            raise UserError(f"--filter must be one of {', '.join(FILTERS)}, got {self.filter!r}")
        if self.proj_pitch < 1 or self.factor % self.proj_pitch:
            raise UserError(f"projection pitch {self.proj_pitch} must divide the factor "
                            f"{self.factor}")
        if self.window is not None and not self.window[1] > self.window[0]:
            raise UserError(f"window {self.window}: the high end must exceed the low end")
        if self.window is not None and not math.isfinite(self.window[1] - self.window[0]):
            raise UserError(f"window {self.window}: its width is not a finite number")
        if self.edge_pad < 0:
            raise UserError(f"--edge-pad must be >= 0 LR pixels, got {self.edge_pad}")
        if not 0 < self.attenuation_per_cm <= MAX_ATTENUATION_PER_CM:
            raise UserError(f"--attenuation must be > 0 and <= {MAX_ATTENUATION_PER_CM:g} "
                            f"1/cm, got {self.attenuation_per_cm:g}")
        self._check_finite()

    def _check_finite(self) -> None:
        """UserError for inf or nan where only finite values mean anything."""
        values = {"--rotation": (self.rotation_deg,), "--shift-um": self.shift_um,
                  "--smoothing": (self.smoothing,), "--window": self.window or (),
                  "--attenuation": (self.attenuation_per_cm,)}
        for option, vals in values.items():
            if not all(math.isfinite(v) for v in vals):
                raise UserError(f"{option} must be finite, got {vals}")

    @property
    def noiseless(self) -> bool:
        return self.photons is None or math.isinf(self.photons)


# ----------------------------------------------------------------------------- geometry

def auto_proj_pitch(factor: int) -> int:
    """Default projection pitch: 2 HR pixels when it divides the factor (and factor >= 4;
    the difference to full resolution is far below the noise, docs/simulate.md), else 1."""
    return 2 if factor >= 4 and factor % 2 == 0 else 1


def _detector(hr_shape: tuple[int, int], params: SimParams, spacing_xy_um: float
              ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(LR bins, fine detector offsets t, ray samples s), both in HR pixels from the centre.

    The detector covers the field's diagonal plus the shift; LR bin centres are symmetric
    about the rotation centre; each LR bin holds factor/proj_pitch fine bins."""
    ny, nx = hr_shape
    f, r = params.factor, params.proj_pitch
    reach = 0.5 * math.hypot(ny, nx) + math.hypot(*params.shift_um) / spacing_xy_um
    n_bins = 2 * math.ceil(reach / f) + 2
    n_fine = n_bins * (f // r)
    t = (torch.arange(n_fine, dtype=torch.float64) - (n_fine - 1) / 2) * r
    n_s = math.ceil(2 * reach / r) + 2
    s = (torch.arange(n_s, dtype=torch.float64) - (n_s - 1) / 2) * r
    return n_bins, t, s


def _shift_px(params: SimParams, spacing_xy_um: float) -> tuple[float, float]:
    return (params.shift_um[0] / spacing_xy_um, params.shift_um[1] / spacing_xy_um)


def _view_grids(hr_shape: tuple[int, int], params: SimParams, spacing_xy_um: float,
                views: np.ndarray, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Sampling grid (len(views), n_s, n_t, 2) in grid_sample units for the moved object.

    A ray of view angle phi at detector offset t passes through p = t e + s e_perp
    (e = (cos phi, sin phi)); the moved object at p is the unmoved object at
    q = R(-a) (p - d) = t e' + s e'_perp - R(-a) d with e' = e(phi - a): we sample there.
    """
    ny, nx = hr_shape
    a = math.radians(params.rotation_deg)
    dx, dy = _shift_px(params, spacing_xy_um)
    ox = math.cos(a) * dx + math.sin(a) * dy          # R(-a) d
    oy = -math.sin(a) * dx + math.cos(a) * dy
    # grid_sample(align_corners=False): -1/+1 are the outer edges of the image
    sx, sy = 2.0 / nx, 2.0 / ny
    grid = torch.empty(len(views), len(s), len(t), 2, dtype=torch.float32)
    tf, sf = t.to(torch.float32), s.to(torch.float32)
    for i, phi in enumerate(views):
        c, sn = math.cos(phi - a), math.sin(phi - a)
        torch.sub((tf * (c * sx) - ox * sx)[None, :], (sf * (sn * sx))[:, None],
                  out=grid[i, :, :, 0])
        torch.add((tf * (sn * sy) - oy * sy)[None, :], (sf * (c * sy))[:, None],
                  out=grid[i, :, :, 1])
    return grid


# ----------------------------------------------------------------------------- physics steps

def gray_to_mu(gray: np.ndarray, window: tuple[float, float], mu_hi_per_um: float) -> np.ndarray:
    """Linear attenuation (1/um) from gray values: lo -> 0, hi -> mu_hi, below lo -> 0.

    Computed in float64 (gray values of any size or precision), clipped at MAX_MU_PER_UM so
    the projector's sums stay finite for outliers far above the window."""
    lo, hi = window
    mu = np.maximum(np.asarray(gray, np.float64) - lo, 0.0) * (mu_hi_per_um / (hi - lo))
    return np.minimum(mu, MAX_MU_PER_UM).astype(np.float32)


def mu_to_gray(mu: np.ndarray, window: tuple[float, float], mu_hi_per_um: float) -> np.ndarray:
    """Inverse of :func:`gray_to_mu` (no clipping at lo: negative mu gives gray below lo),
    computed in float64 and kept within the float32 range."""
    lo, hi = window
    gray = lo + np.asarray(mu, np.float64) * ((hi - lo) / mu_hi_per_um)
    big = float(np.finfo(np.float32).max)
    return np.clip(gray, -big, big).astype(np.float32)


def forward_project(mu: np.ndarray, params: SimParams, spacing_xy_um: float) -> np.ndarray:
    """Transmitted intensity per LR detector bin, (views, n_bins), of the moved object.

    ``mu`` is one (y, x) attenuation slice at HR pitch (1/um), or a (b, y, x) stack that shares
    the sampling grids (result (b, views, n_bins); cheaper per slice). Line integrals are
    sampled at ``proj_pitch`` HR pixels on an area-downsampled copy of ``mu``, turned into
    transmission exp(-p) and averaged over the factor/proj_pitch sub-bins of each LR bin.
    """
    single = mu.ndim == 2
    mu = mu[None] if single else mu
    b, ny, nx = mu.shape
    r = params.proj_pitch
    img = mu if r == 1 else mu.reshape(b, ny // r, r, nx // r, r).mean(axis=(2, 4))
    n_bins, t, s = _detector((ny, nx), params, spacing_xy_um)
    sub, chunk = params.factor // r, 4
    angles = 2 * np.pi * np.arange(params.views) / params.views
    inp = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]   # (1, b, h, w)
    step_um = r * spacing_xy_um
    trans = torch.empty(b, params.views, n_bins, dtype=torch.float64)
    for v0 in range(0, params.views, chunk):
        ang = angles[v0:v0 + chunk]
        grid = _view_grids((ny, nx), params, spacing_xy_um, ang, t, s)
        samples = F.grid_sample(inp.expand(len(ang), *inp.shape[1:]), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)   # (n, b, s, t)
        p = samples.sum(dim=2).to(torch.float64) * step_um                  # (n, b, n_fine)
        binned = torch.exp(-p).reshape(len(ang), b, n_bins, sub).mean(3)
        trans[:, v0:v0 + len(ang)] = binned.transpose(0, 1)
    return trans[0].numpy() if single else trans.numpy()


def add_noise(trans: np.ndarray, photons: float | None, rng: np.random.Generator) -> np.ndarray:
    """Line integrals -log(I / I0) after Poisson counting (counts clamped to >= 1)."""
    if photons is None or math.isinf(photons):
        return -np.log(np.maximum(trans, 1e-30))
    counts = rng.poisson(photons * trans).astype(np.float64)
    return -np.log(np.maximum(counts, 1.0) / photons)


def _filter_response(n_pad: int, name: str) -> np.ndarray:
    """Ramp filter (Kak & Slaney's spatial form, unit pitch) times a window, rfft layout."""
    n = np.concatenate([np.arange(0, n_pad // 2 + 1), np.arange(-(n_pad // 2) + 1, 0)])
    h = np.zeros(n_pad)
    h[0] = 0.25
    odd = n % 2 == 1
    h[odd] = -1.0 / (np.pi * n[odd]) ** 2
    ramp = np.abs(np.fft.rfft(h))
    fn = np.fft.rfftfreq(n_pad) * 2.0            # 0 .. 1 (1 = Nyquist)
    window = {
        "ramp": np.ones_like(fn),
        "shepp-logan": np.sinc(fn / 2.0),
        "cosine": np.cos(np.pi * fn / 2.0),
        "hamming": 0.54 + 0.46 * np.cos(np.pi * fn),
        "hann": 0.5 + 0.5 * np.cos(np.pi * fn),
    }[name]
    return ramp * window


def fbp(sino: np.ndarray, out_shape: tuple[int, int], pitch_px: float, bin_um: float,
        filter_name: str) -> np.ndarray:
    """Filtered back-projection of a 360-degree parallel-beam sinogram (views, n_bins).

    Detector bin centres are symmetric about the rotation centre, which is the centre of the
    output grid; ``pitch_px`` is the output pixel size in detector bins (1 for the LR grid),
    ``bin_um`` the detector pitch in um. Returns mu in 1/um on ``out_shape``.
    """
    n_views, n_bins = sino.shape
    n_pad = max(64, 1 << math.ceil(math.log2(2 * n_bins)))
    resp = _filter_response(n_pad, filter_name)
    q = np.fft.irfft(np.fft.rfft(sino, n=n_pad, axis=1) * resp, n=n_pad, axis=1)[:, :n_bins]
    q = torch.from_numpy(q / bin_um)
    ny, nx = out_shape
    y = (torch.arange(ny, dtype=torch.float64) + 0.5 - ny / 2) * pitch_px
    x = (torch.arange(nx, dtype=torch.float64) + 0.5 - nx / 2) * pitch_px
    ang = torch.as_tensor(2 * np.pi * np.arange(n_views) / n_views)
    out = torch.zeros(ny * nx, dtype=torch.float64)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    for v0 in range(0, n_views, 32):
        c, sn = torch.cos(ang[v0:v0 + 32])[:, None], torch.sin(ang[v0:v0 + 32])[:, None]
        u = xx[None] * c + yy[None] * sn + (n_bins - 1) / 2          # (views, pixels)
        i0 = u.floor().clamp(0, n_bins - 2)
        w = u - i0
        i0 = i0.long()
        qv = q[v0:v0 + 32]
        out += (torch.gather(qv, 1, i0) * (1 - w) + torch.gather(qv, 1, i0 + 1) * w).sum(0)
    return (out * (np.pi / n_views)).reshape(ny, nx).numpy()


# ----------------------------------------------------------------------------- one slice

def simulate_slab(hr_slab: np.ndarray, params: SimParams, hr_spacing_um: tuple[float, float, float],
                  rng: np.random.Generator, window: tuple[float, float] | None = None
                  ) -> np.ndarray:
    """One LR slice (float32 gray values) from the (n <= factor, y, x) HR slab it covers."""
    return simulate_slabs([hr_slab], params, hr_spacing_um, [rng], window)[0]


def simulate_slabs(hr_slabs: list[np.ndarray], params: SimParams,
                   hr_spacing_um: tuple[float, float, float], rngs: list[np.random.Generator],
                   window: tuple[float, float] | None = None) -> list[np.ndarray]:
    """LR slices for several HR slabs at once (they share the projector's sampling grids);
    slab i uses ``rngs[i]`` for its noise, so the result does not depend on the grouping."""
    window = window or params.window
    if window is None:
        raise ValueError("simulate_slab needs a gray window (params.window or window=)")
    f = params.factor
    mu_hi = params.attenuation_per_cm * 1e-4
    mus = []
    for slab in hr_slabs:
        slab = slab[None] if slab.ndim == 2 else slab
        if slab.shape[1] % f or slab.shape[2] % f:
            raise UserError(f"slice size {slab.shape[1]} x {slab.shape[2]} is not divisible "
                            f"by the factor {f}")
        mus.append(gray_to_mu(slab.mean(axis=0, dtype=np.float64), window, mu_hi))
    sxy = float(hr_spacing_um[2])
    e = params.edge_pad
    stack = np.stack(mus)
    if e:       # the object goes on beyond the field: repeat its edge rather than air
        stack = np.pad(stack, ((0, 0), (e * f, e * f), (e * f, e * f)), mode=PAD_MODE)
    trans = forward_project(stack, params, sxy)
    ny, nx = stack.shape[1:]
    out = []
    for tr, rng in zip(trans, rngs):
        sino = add_noise(tr, None if params.noiseless else params.photons, rng)
        rec = fbp(sino, (ny // f, nx // f), 1.0, f * sxy, params.filter)
        if params.smoothing > 0:
            rec = ndimage.gaussian_filter(rec, params.smoothing, mode="nearest")
        rec = rec[e:rec.shape[0] - e, e:rec.shape[1] - e]
        out.append(mu_to_gray(rec, window, mu_hi))
    return out


# ----------------------------------------------------------------------------- whole volume

def default_window(hr: Any, n_sample: int = 16) -> tuple[float, float]:
    """Gray window (lo, hi): lo = 0 for unsigned integers (else the 0.1th percentile),
    hi = the 99.9th percentile of up to ``n_sample`` evenly spaced slices."""
    nz = hr.shape[0]
    idx = np.unique(np.linspace(0, nz - 1, min(n_sample, nz)).round().astype(int))
    sample = np.stack([finite_slices(np.asarray(hr[int(i)]), hr.path, int(i), _FINITE_HINT)
                       for i in idx])
    if np.issubdtype(sample.dtype, np.unsignedinteger):
        lo = 0.0
    else:
        lo = float(np.percentile(sample, 0.1))
    hi = float(np.percentile(sample, 99.9))
    if not hi > lo:     # a constant sample: a window one gray level (or a part in 1e6) wide
        hi = lo + max(1.0, abs(lo) * 1e-6)
    return (lo, hi)


def random_motion(seed: int, lr_pixel_um: float) -> tuple[float, tuple[float, float]]:
    """(rotation_deg, (shift_x_um, shift_y_um)) drawn from ``seed``: rotation uniform in
    +-RANDOM_ROTATION_DEG, each shift component uniform in +-RANDOM_SHIFT_LR_PX LR pixels."""
    rng = np.random.default_rng([seed, 7919])
    rot = float(rng.uniform(-RANDOM_ROTATION_DEG, RANDOM_ROTATION_DEG))
    sx, sy = rng.uniform(-RANDOM_SHIFT_LR_PX, RANDOM_SHIFT_LR_PX, size=2) * lr_pixel_um
    return round(rot, 4), (round(float(sx), 3), round(float(sy), 3))


def check_input(shape: tuple[int, ...], factor: int, path: Any) -> None:
    """UserError for a 2D input or an in-plane size the factor does not divide."""
    if len(shape) != 3 or shape[0] < 2:
        raise UserError(f"is 2D (shape {tuple(shape)}); simulate needs a 3D volume "
                        "(z, y, x) with at least 2 slices", path)
    _, ny, nx = shape
    if ny % factor or nx % factor:
        raise UserError(f"slice size {ny} x {nx} (y x x) is not divisible by --factor "
                        f"{factor}; crop it to a multiple of {factor} first", path)


# what finite_slices adds to its message here: attenuation and noise need finite gray values
_FINITE_HINT = "; simulate needs finite gray values (replace them, e.g. by 0, first)"


def check_name(name: str | None) -> None:
    """UserError unless ``name`` (--name) is a plain file name prefix."""
    if name is None:
        return
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if not name.strip() or name in (".", "..") or any(c in name for c in seps):
        raise UserError(f"--name {name!r} must be a plain file name prefix (no folders)")


def lr_name(out: str | Path, name: str | None) -> str:
    """The file name prefix: ``name`` (--name, checked) or the output folder's name."""
    check_name(name)
    return name or Path(out).resolve().name


def output_targets(out: str | Path, fmt: str, name: str | None = None) -> list[Path]:
    """What a run replaces: the folder ``out`` (nrecon), or ``<name>.tif`` and
    ``simulation.json`` inside it (tif)."""
    out = Path(out)
    if fmt == "nrecon":
        return [out]
    return [out / f"{lr_name(out, name)}.tif", out / "simulation.json"]


def photons_note() -> str:
    """Why the default photon count is what it is (also written into simulation.json)."""
    return (f"default photons = {HR_PHOTONS_PER_PIXEL:g} open-beam photons per 10 um HR "
            f"detector pixel per {HR_EXPOSURE_MS:g} ms view (assumed HR scan: {HR_VIEWS} views x "
            f"{HR_EXPOSURE_MS:g} ms) x 64 (an LR detector pixel bins 8 x 8 HR pixels: 8 in the "
            f"slice, 8 slices) x {LR_EXPOSURE_MS:g}/{HR_EXPOSURE_MS:g} (exposure per view) = "
            f"{DEFAULT_PHOTONS:.0f} per LR detector pixel per view; the LR scan has "
            f"{LR_VIEWS}/{HR_VIEWS} of the views, so its total dose per area is "
            f"{LR_VIEWS * LR_EXPOSURE_MS / (HR_VIEWS * HR_EXPOSURE_MS):.4f} of the HR scan's "
            "(1/46.4). See docs/simulate.md.")


def simulate_volume(hr: Any, out: str | Path, params: SimParams, *,
                    spacing_um: tuple[float, float, float] | None = None, fmt: str = "nrecon",
                    name: str | None = None, overwrite: bool = False, quiet: bool = False,
                    random_motion_used: bool = False, workers: int = 0) -> dict:
    """Simulate the LR scan of the HR ``Volume`` ``hr`` into the folder ``out``.

    ``fmt="nrecon"``: ``out`` becomes an NRecon-style folder ``<name>_rec%08d.bmp|tif`` +
    ``<name>_rec.log``; ``fmt="tif"``: ``out/<name>.tif`` (multi-page). Either way
    ``out/simulation.json`` holds the truth. ``workers``: processes (one torch thread each;
    0 = one per CPU core, at most 8). Returns the truth (plus output path, timing).
    """
    from .volume import create_volume_writer

    params.validate()
    name = lr_name(out, name)
    out = Path(out)
    spacing = _check_volume(hr, params, spacing_um)
    if fmt not in ("nrecon", "tif"):
        raise UserError(f"--format must be nrecon or tif, got {fmt!r}")
    f = params.factor
    nz, ny, nx = hr.shape
    lr_shape = (-(-nz // f), ny // f, nx // f)
    lr_spacing = tuple(float(s) * f for s in spacing)
    n_workers = _n_workers(workers, lr_shape[0])
    check_memory(hr, params, spacing[2], n_workers)
    dtype = np.dtype(hr.dtype)
    description = f"microct-sr simulate: LR scan of {hr.path}"
    # the writer checks the output (exists, parent folder, free space) when it opens, so
    # that comes before the default window's sample (a NIfTI/MHA/NRRD is read whole for it)
    run = (hr, params, spacing, lr_spacing, n_workers, quiet, random_motion_used)
    if fmt == "nrecon":
        with create_volume_writer(out, lr_shape, dtype, lr_spacing, overwrite=overwrite,
                                  description=description, nrecon_prefix=f"{name}_",
                                  nrecon_log=_nrecon_log(params)) as writer:
            truth = _write_lr(writer, *run, output=str(out))
            writer.add_file("simulation.json", _json_text(truth))  # inside the atomic rename
        return truth
    with _tif_folder(out, overwrite) as folder:
        with create_volume_writer(folder / f"{name}.tif", lr_shape, dtype, lr_spacing,
                                  overwrite=overwrite, description=description) as writer:
            truth = _write_lr(writer, *run, output=str(out / f"{name}.tif"))
        atomic_write(folder / "simulation.json", lambda p: p.write_text(_json_text(truth)))
    return truth


def _write_lr(writer: Any, hr: Any, params: SimParams, spacing: tuple[float, float, float],
              lr_spacing: tuple[float, ...], n_workers: int, quiet: bool,
              random_motion_used: bool, output: str) -> dict:
    """Simulate every LR slice into ``writer``; returns the truth (``simulation.json``) with
    the gray window, the output path, the timing and the worker count."""
    from .progress import progress
    from .volume import to_dtype

    window = params.window or default_window(hr)
    truth = _truth(params, window, spacing, lr_spacing, hr, writer.shape, random_motion_used)
    truth["output"] = output
    t0 = time.perf_counter()
    slices = _lr_slices(hr, params, spacing, window, n_workers)
    for lr in progress(slices, total=writer.shape[0], desc="simulate", quiet=quiet,
                       unit="slice"):
        writer.write(to_dtype(_in_range(lr, writer.dtype), writer.dtype)[None])
    truth["seconds"] = round(time.perf_counter() - t0, 2)
    truth["workers"] = n_workers
    return truth


def _in_range(lr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``lr`` clipped to a float ``dtype``'s finite range (float16: +-65504), so the cast
    never makes inf; integer types are clipped by ``to_dtype`` itself."""
    if np.dtype(dtype).kind != "f":
        return lr
    big = float(np.finfo(dtype).max)
    return np.clip(lr, -big, big)


@contextmanager
def _tif_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """The folder for ``--format tif``: ``out`` itself when it exists (empty, or any with
    --overwrite; its files are each replaced atomically), else a temporary folder beside it,
    renamed to ``out`` on success and removed on failure, so a failed run leaves no ``out``."""
    from .volume.base import TMP_PREFIX

    if out.exists():
        if not out.is_dir():
            raise UserError("exists and is not a folder", out)
        if any(out.iterdir()) and not overwrite:
            raise UserError("exists and is not empty; use --overwrite to replace it", out)
        yield out
        return
    if not out.parent.is_dir():
        raise UserError("the output's parent folder does not exist", out.parent)
    tmp = out.parent / f"{TMP_PREFIX}{os.getpid()}-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out, replace=False)  # not over a folder another run made meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_text(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _check_volume(hr: Any, params: SimParams, spacing_um: tuple[float, float, float] | None
                  ) -> tuple[float, float, float]:
    """The HR spacing to use; UserError for 2D input, bad factor, unknown/non-square pixels."""
    check_input(tuple(hr.shape), params.factor, hr.path)
    spacing = spacing_um or hr.spacing_um
    if spacing is None:
        raise UserError("has no voxel size in its metadata; give --spacing-um", hr.path)
    if abs(spacing[1] - spacing[2]) > 1e-3 * spacing[2]:
        raise UserError(f"in-plane voxel size {spacing[1]} x {spacing[2]} um is not square; "
                        "the simulation needs square pixels", hr.path)
    _check_shift(tuple(hr.shape), params, float(spacing[2]), hr.path)
    return tuple(float(s) for s in spacing)


def _check_shift(shape: tuple[int, ...], params: SimParams, spacing_xy_um: float,
                 path: Any) -> None:
    """UserError when --shift-um moves the object out of the field of view (the detector
    would have to span the shift: memory and time without any object in the LR scan).
    Shifts up to the --random-motion range are always allowed, also for tiny fields."""
    random_max = RANDOM_SHIFT_LR_PX * params.factor * spacing_xy_um
    for value, n, axis in zip(params.shift_um, (shape[2], shape[1]), "xy"):
        limit = max(n * spacing_xy_um, random_max)
        if abs(value) > limit:
            raise UserError(f"--shift-um {axis} = {value:g} um moves the object out of the "
                            f"field of view ({n * spacing_xy_um:g} um wide in {axis}); "
                            f"at most {limit:g} um", path)


def estimate_memory_bytes(shape: tuple[int, int, int], itemsize: int, params: SimParams,
                          spacing_xy_um: float, workers: int) -> float:
    """Peak memory (bytes, beyond the imported libraries) of a run on an HR volume of
    ``shape``: the default-window sample, or ``workers`` tasks in flight (HR slabs, padded
    attenuation, the projector's sampling grids, sinograms, FBP). Float arithmetic, so
    absurd options give a huge number rather than an overflow."""
    nz, ny, nx = (float(n) for n in shape)
    f, r, pad = params.factor, params.proj_pitch, 2.0 * params.edge_pad * params.factor
    py, px = ny + pad, nx + pad
    reach = 0.5 * math.hypot(py, px) + math.hypot(*params.shift_um) / spacing_xy_um
    n_bins = 2 * reach / f + 4
    n_fine, n_s = n_bins * f / r, 2 * reach / r + 2
    n_lr = math.ceil(nz / f)
    b = float(np.clip(n_lr // (2 * max(workers, 1)), 1, 4))
    slab = min(f, nz) * ny * nx * itemsize
    task = (b * slab + 3 * b * py * px * 4 + 4 * n_s * n_fine * (8 + 4 * b)
            + b * params.views * n_bins * 8 + params.views * (4 * n_bins + 64) * 32
            + 2048 * (py / f) * (px / f))
    in_flight = 4 * workers * b * slab if workers > 1 else 0.0   # slabs queued, pickled
    window = 0.0 if params.window else min(16.0, nz) * ny * nx * (2 * itemsize + 1)
    return max(window, max(workers, 1) * task + in_flight)


def check_memory(hr: Any, params: SimParams, spacing_xy_um: float, workers: int) -> None:
    """UserError naming the HR volume when the run would need more memory than is available
    (refused up front, not by the OOM killer half-way)."""
    from .phantom import available_memory_bytes

    need = estimate_memory_bytes(tuple(hr.shape), np.dtype(hr.dtype).itemsize, params,
                                 spacing_xy_um, workers)
    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise UserError(f"simulating it needs about {need / 2**30:.3g} GiB of memory with "
                        f"{workers} worker(s); {avail / 2**30:.1f} GiB are available (fewer "
                        "--workers, --views or --edge-pad, or a smaller volume)", hr.path)


def _n_workers(workers: int, n_slices: int) -> int:
    """Processes to use: ``workers`` or one per core (max 8), never more than slices / 2."""
    import os

    n = workers if workers > 0 else min(os.cpu_count() or 1, 8)
    return max(1, min(n, n_slices // 2))


def _slab_task(slabs: list[np.ndarray], params: SimParams,
               spacing: tuple[float, float, float], window: tuple[float, float],
               ks: list[int]) -> list[np.ndarray]:
    """LR slices ``ks``, each with its own reproducible noise stream (seed, k)."""
    rngs = [np.random.default_rng([params.seed, k]) for k in ks]
    return simulate_slabs(slabs, params, spacing, rngs, window)


def _init_worker(parent: int | None = None) -> None:
    """One torch thread; and exit when the parent process is gone (killed outright, SIGKILL:
    the pool's workers would otherwise sit orphaned and idle for ever)."""
    torch.set_num_threads(1)
    if parent is not None:
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _lr_slices(hr: Any, params: SimParams, spacing: tuple[float, float, float],
               window: tuple[float, float], workers: int):
    """Yield the LR slices in order, computed in this process or in a process pool
    (spawned, one torch thread each, at most 2 tasks in flight per worker). A task is up to
    4 LR slices sharing the projector's grids (same result as one at a time)."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    f, nz = params.factor, hr.shape[0]
    n_lr = -(-nz // f)
    batch = int(np.clip(n_lr // (2 * workers), 1, 4))
    tasks = [list(range(k, min(k + batch, n_lr))) for k in range(0, n_lr, batch)]

    def args(ks: list[int]) -> tuple:
        slabs = [finite_slices(hr.read(k * f, min(nz, (k + 1) * f)), hr.path, k * f,
                               _FINITE_HINT) for k in ks]
        return slabs, params, spacing, window, ks

    if workers <= 1:            # one core: one torch thread (faster on a busy machine)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for ks in tasks:
                yield from _slab_task(*args(ks))
        finally:
            torch.set_num_threads(threads)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        try:
            for ks in tasks:
                pending.append(pool.submit(_slab_task, *args(ks)))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _truth(params: SimParams, window: tuple[float, float], spacing: tuple[float, ...],
           lr_spacing: tuple[float, ...], hr: Any, lr_shape: tuple[int, ...],
           random_motion_used: bool) -> dict:
    """The ``simulation.json`` document."""
    return {
        "factor": params.factor, "views": params.views,
        "photons": None if params.noiseless else float(params.photons),
        "photons_note": photons_note(),
        "smoothing": params.smoothing, "filter": params.filter,
        "rotation_deg": float(params.rotation_deg),
        "shift_um": [float(params.shift_um[0]), float(params.shift_um[1])],
        "random_motion": random_motion_used, "seed": params.seed,
        "hr_spacing_um": [float(s) for s in spacing], "lr_spacing_um": list(lr_spacing),
        "hr_shape": [int(s) for s in hr.shape], "lr_shape": list(lr_shape),
        "hr_path": str(hr.path), "hr_dtype": str(np.dtype(hr.dtype)),
        "window": [float(window[0]), float(window[1])],
        "attenuation_per_cm": params.attenuation_per_cm,
        "projection": (f"parallel beam, {params.views} views over 360 degrees, ray-driven "
                       f"bilinear projector at {params.proj_pitch} HR pixel pitch, detector "
                       f"bins of {params.factor} HR pixels averaging exp(-p)"),
        "proj_pitch_hr_px": params.proj_pitch,
        "edge_pad_lr_px": params.edge_pad,
        "conventions": CONVENTIONS,
    }


def _nrecon_log(params: SimParams) -> dict:
    """Extra NRecon log entries (the writer adds pixel size, file names, sections)."""
    filt = {"hamming": "Hamming (Alpha=0.54)", "hann": "Hann", "cosine": "Cosine",
            "shepp-logan": "Shepp-Logan", "ramp": "Ramp (no window)"}[params.filter]
    return {
        "Acquisition": {"Number of Files": params.views,
                        "Rotation Step (deg)": f"{360.0 / params.views:.6f}",
                        "Use 360 Rotation": "YES"},
        "Reconstruction": {"Filter type description": filt,
                           "Smoothing": 1 if params.smoothing > 0 else 0,
                           "Smoothing kernel": "2 (Gaussian)",
                           "Smoothing sigma (pixels)": f"{params.smoothing:g}",
                           "Simulated": "YES (microct-sr simulate; truth in simulation.json)"},
    }
