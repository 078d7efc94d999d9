"""The pairing's geometry: the LR -> HR rigid transform and simulate's motion convention.

:class:`Rigid` maps an LR position to an HR position, ``P_hr = factor * R(angle) @ P_lr + t_hr``
(pixels, corner origin, (x, y)); :func:`motion_of` / :func:`rigid_from_motion` convert to and
from simulate's motion (``CONVENTIONS``, as written to ``registration.json``). Pure numpy: this
module imports nothing else from the package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONVENTIONS = {
    "frame": "arrays (z, y, x); positions p = (x, y) in micrometres from the corner of pixel "
             "(0, 0) of each scan (x = column, right; y = row, down)",
    "motion": "p_lr = R(angle_deg) (p_hr - c) + c + shift_um: an HR point p_hr appears at p_lr "
              "in the LR scan; c = centre of the HR slice field of view (x_size/2, y_size/2); "
              "the same convention as simulate's simulation.json (rotation_deg, shift_um), so "
              "the two compare directly. Undo: p_hr = R(-angle_deg) (p_lr - c - shift_um) + c",
    "rotation": "R(a) = [[cos a, -sin a], [sin a, cos a]] acting on (x, y): a positive angle "
                "turns +x towards +y, i.e. clockwise as displayed with y pointing down",
    "shift_hr_px": "shift_um in HR pixels (given also when the voxel size is unknown)",
    "lr_to_hr_px": "2x3 affine [A | b]: (x_hr, y_hr) = A (x_lr, y_lr) + b in pixel units with "
                   "corner origin, i.e. LR pixel (i, j) centre (j + 0.5, i + 0.5)",
    "z": "LR slice k covers HR slices [factor*k + z_offset_hr_slices, factor*k + "
         "z_offset_hr_slices + factor); its HR patch is slice factor*k + z_offset_hr_slices + "
         "factor//2 (simulate's z_offset is 0)",
    "resampled": "HR is resampled (cubic) into the LR orientation; LR pixels are untouched",
    "lr_x_lr_y": "pairs.csv: centre of the LR crop in LR pixels (corner origin): the crop is "
                 "LR[lr_slice, lr_y - p/2 : lr_y + p/2, lr_x - p/2 : lr_x + p/2]",
    "hr_x_hr_y": "pairs.csv: centre of the HR crop in the HR scan's own pixels (corner origin)",
}


@dataclass
class Rigid:
    """``P_hr = factor * R(angle_deg) @ P_lr + t_hr`` (pixels, corner origin, (x, y))."""

    angle_deg: float
    t_hr: tuple[float, float]
    factor: int

    def rotation(self) -> np.ndarray:
        a = math.radians(self.angle_deg)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

    def lr_to_hr(self, pts_lr: np.ndarray) -> np.ndarray:
        """(n, 2) LR (x, y) -> (n, 2) HR (x, y)."""
        return self.factor * np.asarray(pts_lr, float) @ self.rotation().T + np.asarray(self.t_hr)


def rotation_angle_deg(m: np.ndarray) -> float:
    """Angle of the rotation part of a 2x2 (or 2x3) similarity matrix."""
    return math.degrees(math.atan2(m[1, 0], m[0, 0]))


def fit_rigid(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares rotation + translation (no scale) taking ``src`` (n, 2) onto ``dst``."""
    cs, cd = src.mean(0), dst.mean(0)
    a, b = src - cs, dst - cd
    num = np.sum(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    den = np.sum(a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1])
    ang = math.atan2(num, den)
    r = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    return math.degrees(ang), cd - r @ cs


def motion_of(rigid: Rigid, hr_shape_yx: Sequence[int]) -> tuple[float, np.ndarray]:
    """``rigid`` (LR -> HR) as simulate's motion: (angle_deg, shift in HR px) with
    p_lr = R(angle) (p_hr - c) + c + shift, c the HR field's centre."""
    c = np.array([hr_shape_yx[1], hr_shape_yx[0]], float) / 2
    a = math.radians(rigid.angle_deg)
    r_inv = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return -rigid.angle_deg, r_inv @ (c - np.asarray(rigid.t_hr)) - c


def rigid_from_motion(angle_deg: float, shift_hr_px: Sequence[float], factor: int,
                      hr_shape_yx: Sequence[int]) -> Rigid:
    """The inverse of :func:`motion_of`: simulate's motion (p_lr = R(angle) (p_hr - c) + c +
    shift, HR px) as the LR -> HR :class:`Rigid`, p_hr = R(-angle) (p_lr - c - shift) + c."""
    c = np.array([hr_shape_yx[1], hr_shape_yx[0]], float) / 2
    a = math.radians(-angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    t = c - r @ (c + np.asarray(shift_hr_px, float))
    return Rigid(angle_deg=-angle_deg, t_hr=(float(t[0]), float(t[1])), factor=factor)
