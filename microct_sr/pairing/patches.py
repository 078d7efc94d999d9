"""Patch cutting: candidate centres, the HR crop resampled into the LR orientation, the
field-of-view and NCC screens (:func:`slice_patches`, :func:`iter_patches`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .geometry import Rigid
from .images import _cv2, cubic_up, ncc, stretch_u8
from .keypoints import detect
from .registration import Registration, refine_ncc
from .scans import PairOptions, _Reader, valid_lr_slices


@dataclass
class Patch:
    """One LR/HR pair; ``lr`` is (p, p), or (2N+1, p, p) with ``--context N`` (centre page N)."""

    lr_slice: int
    hr_slice: int
    lr_x: float
    lr_y: float
    hr_x: float
    hr_y: float
    ncc: float
    lr: np.ndarray
    hr: np.ndarray
    rigid: Rigid


def hr_crop(hr_slice: np.ndarray, rigid: Rigid, j0: int, i0: int, size_hr: int) -> np.ndarray:
    """HR crop in the LR orientation covering LR pixels [i0, i0+p) x [j0, j0+p) (cubic)."""
    cv2 = _cv2()
    r = rigid.rotation()
    off = r @ [0.5, 0.5] + rigid.factor * (r @ [j0, i0]) + np.asarray(rigid.t_hr) - 0.5
    m = np.hstack([r, off[:, None]])
    src = hr_slice if hr_slice.dtype in (np.uint8, np.uint16, np.float32) else \
        hr_slice.astype(np.float32)
    out = cv2.warpAffine(src, m, (size_hr, size_hr),
                         flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    if out.dtype != hr_slice.dtype:
        from ..volume import to_dtype

        out = to_dtype(out, hr_slice.dtype)
    return out


def _hr_corners_inside(rigid: Rigid, j0: int, i0: int, p: int, hr_shape: tuple[int, int],
                       margin: float = 2.0) -> bool:
    c = rigid.lr_to_hr(np.array([[j0, i0], [j0 + p, i0], [j0, i0 + p], [j0 + p, i0 + p]], float))
    return bool((c[:, 0] >= margin).all() and (c[:, 0] <= hr_shape[1] - margin).all()
                and (c[:, 1] >= margin).all() and (c[:, 1] <= hr_shape[0] - margin).all())


def slice_patches(lr_slice: np.ndarray, hr_slice: np.ndarray, k: int, hr_k: int, rigid: Rigid,
                  opts: PairOptions, u: int, points: np.ndarray | None = None,
                  lr_pages: np.ndarray | None = None) -> tuple[list[Patch], dict[str, int]]:
    """Candidate centres (A-KAZE keypoints of the LR slice, strongest first), kept when both
    crops lie inside their fields of view, the NCC passes and no kept patch is closer than
    half a patch. With ``lr_pages`` (the LR slices around ``lr_slice``, (2N+1, Y, X)) the LR
    patch is the same window cut from every page; the screens use ``lr_slice`` alone."""
    p, f = opts.lr_patch, opts.factor
    stats = {"candidates": 0, "outside": 0, "low_ncc": 0, "duplicates": 0}
    if points is None:
        points = detect(stretch_u8(cubic_up(lr_slice, u))).pts / u
    kept: list[Patch] = []
    tried = 0
    for x, y in points:
        j0, i0 = round(float(x) - p / 2), round(float(y) - p / 2)
        stats["candidates"] += 1
        if j0 < 0 or i0 < 0 or j0 + p > lr_slice.shape[1] or i0 + p > lr_slice.shape[0] or \
                not _hr_corners_inside(rigid, j0, i0, p, hr_slice.shape):
            stats["outside"] += 1
            continue
        cx, cy = j0 + p / 2, i0 + p / 2
        if any(math.hypot(cx - q.lr_x, cy - q.lr_y) < p / 2 for q in kept):
            stats["duplicates"] += 1
            continue
        if tried >= 8 * opts.max_patches_per_slice:
            break
        tried += 1
        lr_c = lr_slice[i0:i0 + p, j0:j0 + p]
        hr_c = hr_crop(hr_slice, rigid, j0, i0, p * f)
        score = ncc(cubic_up(lr_c, f), hr_c)
        if score < opts.min_ncc:
            stats["low_ncc"] += 1
            continue
        hx, hy = rigid.lr_to_hr(np.array([[cx, cy]]))[0]
        lr_out = lr_c if lr_pages is None else lr_pages[:, i0:i0 + p, j0:j0 + p]
        kept.append(Patch(k, hr_k, cx, cy, float(hx), float(hy), score, lr_out.copy(), hr_c,
                          rigid))
        if len(kept) >= opts.max_patches_per_slice:
            break
    return kept, stats


def iter_patches(lr, hr, reg: Registration, opts: PairOptions,
                 on_slice: Callable[[], None] | None = None) -> Iterable[tuple[list[Patch], dict]]:
    """Patches of every LR slice whose HR slab lies inside HR, in slice order (2 threads).
    With ``opts.context`` N > 0 each LR patch holds LR slices k-N .. k+N (clamped)."""
    f, z0, n = opts.factor, reg.z_offset, opts.context
    reader = _Reader(lr, hr, lr_cache_slices=2 * (2 * n + 1) + opts.jobs if n else 0)
    ks = valid_lr_slices(lr.shape[0], hr.shape[0], f, z0, z0)

    def one(k: int):
        hr_k = f * k + z0 + f // 2
        rigid = reg.rigid
        if opts.refine_per_slice:
            rigid = refine_ncc(reader, [k], rigid, z0, lr.shape[1:], max_change_lr_px=1.5,
                               warn=False)
        pages = reader.lr_stack(k, n) if n else None
        lr_k = reader.lr_slice(k) if pages is None else pages[n]
        out = slice_patches(lr_k, reader.hr_slices(hr_k, hr_k + 1)[0], k, hr_k, rigid, opts,
                            reg.grid_upsample, lr_pages=pages)
        if on_slice:
            on_slice()
        return out

    with ThreadPoolExecutor(max(1, opts.jobs)) as ex:
        yield from ex.map(one, ks)
