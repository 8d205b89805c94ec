"""Procedural lumbar vertebra phantoms and whole lumbar spines (numpy/scipy only).

A vertebra is the zero level set of a signed distance field built from smooth implicit primitives
(superelliptic body, tapered elliptic capsules, rounded and bent plates) joined by smooth unions, so that
surfaces are smooth at 1 mm and thin parts stay attached. Each primitive is evaluated only inside its own
bounding box on the voxel grid.

Local (vertebra) frame, mm, in working-grid order ``(z, y, x)`` = (superior, posterior, patient left):
the origin is the centre of the vertebral body (mid-height, mid-depth, midline), its posterior wall lies
at ``y = +body_depth / 2``. With no rotation the local frame is the working grid's: array axis 0 points
superior, axis 1 posterior, axis 2 to the patient's left.

Whole spines (:func:`synth_spine`) chain L1..L5 with sampled intervertebral discs and lordosis, align the
posterior body walls, couple each inferior facet to the superior facet of the vertebra below, and carve a
gap of at least one voxel wherever two vertebrae would touch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .atomic import make_folder
from .conventions import PATCH_SIZE
from .labels import label_for_level, level_name
from .volume import Geometry, Volume

LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")

_BIG = np.float32(1e3)  # field value where no primitive reaches
Points = tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Morphometry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VertebraMorphometry:
    """Sizes of one lumbar vertebra (mm and degrees).

    Measurement conventions (as the renderer realises them): body sizes are the endplate width (left-right),
    the mid-sagittal depth (anterior-posterior) and the height at the rim; ``canal_width`` is the
    interpedicular distance, ``canal_depth`` the mid-sagittal distance from the posterior body wall to the
    laminae at pedicle level; ``spinous_length`` runs from the posterior body wall to the spinous tip (AP),
    ``spinous_height`` is the tip's superior-inferior extent; facet angles are between the joint plane and
    the mid-sagittal plane in the axial view (0 = sagittal, 90 = coronal).
    """

    level: str
    body_width: float
    body_depth: float
    body_height: float
    body_wedge_deg: float  # anterior minus posterior height as an angle; > 0 = anterior taller
    waist_concavity: float  # how far the body's mid-height wall lies inside the endplate rim
    endplate_concavity: float
    posterior_wall_concavity: float
    pedicle_width: float
    pedicle_height: float
    pedicle_length: float  # posterior body wall to the arch (pedicle-lamina junction)
    pedicle_angle_deg: float  # medial convergence towards the body
    lamina_thickness: float
    lamina_height: float
    lamina_tilt_deg: float  # lower edge leans posteriorly
    canal_width: float
    canal_depth: float
    spinous_length: float
    spinous_height: float
    spinous_thickness: float
    spinous_tilt_deg: float  # the process points posterior-inferior by this angle
    transverse_length: float  # from the pedicle's lateral wall to the tip
    transverse_thickness: float  # anterior-posterior
    transverse_height: float  # superior-inferior
    transverse_angle_deg: float  # posterior sweep in the axial plane
    transverse_elevation_deg: float
    transverse_root_forward: float  # L5: the root reaches forward onto the body by this much
    sap_height: float  # superior articular process: rise above the pedicle's top
    sap_width: float
    sap_thickness: float
    iap_drop: float  # inferior articular process: reach below the inferior endplate (at most)
    iap_width: float
    iap_thickness: float
    superior_facet_angle_deg: float
    inferior_facet_angle_deg: float
    facet_tropism_deg: float  # left minus right facet angle
    transverse_asymmetry: float  # left minus right transverse process length
    facet_gap: float = 2.5  # joint space between this vertebra's facets and its neighbours'


@dataclass(frozen=True)
class FacetJoint:
    """A facet joint in a vertebra's local frame (mm, unit vectors; all ``(z, y, x)``).

    ``centre`` lies on the joint's mid-plane at the superior articular process's mid-height, ``normal``
    points from the superior articular process (of the vertebra below) to the inferior one (of the vertebra
    above), ``up`` is the joint plane's upward direction.
    """

    centre: tuple[float, float, float]
    normal: tuple[float, float, float]
    up: tuple[float, float, float]
    floor: tuple[float, float, float]
    """Top of the pedicle-lamina junction under the superior articular process: the inferior articular
    process above ends 3 mm higher."""

    def moved(self, rot: np.ndarray, shift: np.ndarray) -> FacetJoint:
        """The same joint in another frame: ``p -> rot @ p + shift``."""

        def point(p):
            return tuple((rot @ np.asarray(p) + shift).tolist())

        def vector(v):
            return tuple((rot @ np.asarray(v)).tolist())

        return FacetJoint(point(self.centre), vector(self.normal), vector(self.up), point(self.floor))


# level means L1..L5, standard deviation of the individual variation, hard range
_TABLE: dict[str, tuple[tuple[float, ...], float, tuple[float, float]]] = {
    "body_width": ((44.5, 46.0, 47.5, 49.5, 51.0), 1.8, (39.0, 59.0)),
    "body_depth": ((34.0, 34.5, 34.5, 35.0, 35.0), 1.4, (29.0, 42.0)),
    "body_height": ((26.0, 26.5, 27.0, 27.0, 26.5), 1.1, (23.0, 32.0)),
    "body_wedge_deg": ((-2.0, -1.0, 0.0, 1.5, 4.0), 1.2, (-5.0, 8.0)),
    "waist_concavity": ((1.6,) * 5, 0.4, (0.6, 3.0)),
    "endplate_concavity": ((1.4,) * 5, 0.4, (0.5, 2.5)),
    "posterior_wall_concavity": ((1.0,) * 5, 0.3, (0.0, 2.0)),
    "pedicle_width": ((8.0, 8.5, 10.0, 12.0, 15.0), 1.2, (6.0, 20.0)),
    "pedicle_height": ((15.0, 14.8, 14.5, 14.0, 13.5), 1.0, (11.0, 18.0)),
    "pedicle_length": ((9.0, 9.5, 10.0, 10.0, 10.0), 1.0, (6.0, 14.0)),
    "pedicle_angle_deg": ((10.0, 12.0, 15.0, 18.0, 25.0), 3.0, (3.0, 35.0)),
    "lamina_thickness": ((7.0, 7.0, 7.0, 7.0, 7.0), 0.6, (4.5, 9.0)),
    "lamina_height": ((24.0, 24.0, 23.0, 22.0, 20.0), 1.5, (16.0, 28.0)),
    "lamina_tilt_deg": ((18.0,) * 5, 4.0, (5.0, 35.0)),
    "canal_width": ((22.5, 23.0, 23.5, 24.5, 26.5), 1.8, (21.0, 32.0)),
    "canal_depth": ((17.5, 17.0, 16.0, 16.0, 16.5), 1.3, (13.0, 20.0)),
    "spinous_length": ((52.0, 54.0, 55.0, 53.0, 47.0), 3.0, (43.0, 61.0)),
    "spinous_height": ((21.5, 23.0, 23.5, 21.0, 18.5), 2.5, (17.0, 31.0)),
    "spinous_thickness": ((7.5, 7.5, 7.5, 7.5, 8.0), 0.8, (5.0, 10.0)),
    "spinous_tilt_deg": ((8.0, 10.0, 13.0, 19.0, 28.0), 4.0, (0.0, 40.0)),
    "transverse_length": ((15.0, 19.0, 24.0, 21.0, 17.0), 2.5, (8.0, 32.0)),
    "transverse_thickness": ((5.0, 5.0, 5.0, 5.5, 7.0), 0.6, (3.5, 11.0)),
    "transverse_height": ((9.0, 9.0, 9.5, 10.0, 12.0), 1.0, (6.0, 16.0)),
    "transverse_angle_deg": ((15.0, 15.0, 15.0, 15.0, 20.0), 5.0, (0.0, 35.0)),
    "transverse_elevation_deg": ((0.0, 0.0, 0.0, 5.0, 15.0), 4.0, (-15.0, 30.0)),
    "transverse_root_forward": ((0.0, 0.0, 0.0, 0.0, 8.0), 1.5, (0.0, 14.0)),
    "sap_height": ((13.0, 13.0, 13.0, 12.5, 12.0), 1.2, (7.0, 16.0)),
    "sap_width": ((15.0, 15.0, 15.0, 15.5, 16.0), 1.2, (9.0, 19.0)),
    "sap_thickness": ((8.0, 8.0, 8.0, 8.0, 8.0), 0.6, (4.5, 9.0)),
    "iap_drop": ((10.0, 10.0, 10.0, 9.5, 9.0), 1.2, (5.0, 13.0)),
    "iap_width": ((14.0, 14.0, 14.5, 14.5, 15.0), 1.2, (8.0, 18.0)),
    "iap_thickness": ((8.0, 8.0, 8.0, 8.0, 8.0), 0.6, (4.5, 9.0)),
    "superior_facet_angle_deg": ((30.0, 35.0, 42.0, 50.0, 55.0), 6.0, (28.0, 86.0)),
    "inferior_facet_angle_deg": ((35.0, 42.0, 50.0, 55.0, 62.0), 6.0, (28.0, 86.0)),
    "facet_tropism_deg": ((0.0,) * 5, 3.0, (-10.0, 10.0)),
    "transverse_asymmetry": ((0.0,) * 5, 1.2, (-4.0, 4.0)),
}
# sizes that scale with the person (shared size factor); angles and concavities do not
_SCALED = {
    name for name in _TABLE if not name.endswith("_deg") and name not in {"facet_tropism_deg", "transverse_asymmetry"}
}
VOLUME_RANGE_CM3: tuple[float, float] = (55.5, 72.0)
"""Band the whole-vertebra volume is kept in (lumbar vertebrae are about 50-75 cm^3)."""
_SIZE_CV = 0.03  # coefficient of variation of the whole-person size factor

MORPHOMETRY_RANGES: dict[str, tuple[float, float]] = {name: rng for name, (_, _, rng) in _TABLE.items()}
"""Hard range of every sampled measurement (mm or degrees); the published lumbar ranges where known."""


def _level_index(level: str | int) -> int:
    name = level_name(level) if isinstance(level, (int, np.integer)) else str(level).strip().upper()
    if name not in LEVELS:
        raise ValueError(f"synthetic vertebrae exist for {', '.join(LEVELS)} only, got {level!r}")
    return LEVELS.index(name)


def sample_morphometry(
    level: str | int,
    rng: np.random.Generator,
    *,
    size_factor: float | None = None,
    volume_cm3: tuple[float, float] | None = VOLUME_RANGE_CM3,
) -> VertebraMorphometry:
    """Random lumbar morphometry for ``level`` ('L1'..'L5' or VerSe label 20..24).

    Every measurement is its level mean times a person-size factor, plus individual variation, clipped to
    :data:`MORPHOMETRY_RANGES`. ``size_factor`` is that person's standard-normal size score (a whole spine
    shares one); None draws one. ``volume_cm3``: when the rendered volume falls outside this band, every
    length is scaled by one factor to bring it to the nearest bound (None: no constraint).
    """
    index = _level_index(level)
    size_z = float(np.clip(rng.standard_normal(), -2.0, 2.0)) if size_factor is None else float(size_factor)
    values: dict[str, float] = {}
    for name, (means, sd, (lo, hi)) in _TABLE.items():
        mean = means[index]
        if name in _SCALED:
            mean *= 1.0 + _SIZE_CV * size_z
        values[name] = float(np.clip(mean + sd * rng.standard_normal(), lo, hi))
    m = VertebraMorphometry(level=LEVELS[index], **values)
    if volume_cm3 is None:
        return m
    # the sizes above vary independently, so their product (the volume) spreads more than real vertebrae
    # do: scale all lengths together to bring the rendered volume into the wanted band
    volume = _quick_volume_cm3(m)
    target = float(np.clip(volume, *volume_cm3))
    if abs(target - volume) < 1e-6:
        return m
    scale = (target / volume) ** (1.0 / 3.0)
    scaled = {}
    for name in _SCALED:
        lo, hi = _TABLE[name][2]
        scaled[name] = float(np.clip(getattr(m, name) * scale, lo, hi))
    return replace(m, **scaled)


def _quick_volume_cm3(m: VertebraMorphometry, spacing: float = 1.5) -> float:
    """Rendered volume (cm^3) of a vertebra on a coarse grid (about 2 % from the 1 mm value)."""
    return float(render_vertebra(m, spacing=spacing).sum()) * spacing**3 / 1000.0


# --------------------------------------------------------------------------------------------------
# Signed distance primitives (local frame, arrays ordered z, y, x)
# --------------------------------------------------------------------------------------------------


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth union with blend radius ``k`` mm."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _round_max(a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Intersection of two fields with the edge rounded to radius ``r``."""
    ua, ub = a + r, b + r
    return np.sqrt(np.maximum(ua, 0) ** 2 + np.maximum(ub, 0) ** 2) + np.minimum(np.maximum(ua, ub), 0) - r


def _ellipsoid(q: Sequence[np.ndarray], r: Sequence[np.ndarray | float]) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (first order, exact on the axes)."""
    k0 = np.sqrt(sum((qi / ri) ** 2 for qi, ri in zip(q, r, strict=True)))
    k1 = np.sqrt(sum((qi / (ri * ri)) ** 2 for qi, ri in zip(q, r, strict=True)))
    rmin = np.minimum(np.minimum(r[0], r[1]), r[2])
    rmax = np.maximum(np.maximum(r[0], r[1]), r[2])
    with np.errstate(divide="ignore", invalid="ignore"):
        grad = np.where(k0 > 1e-6, k1 / np.maximum(k0, 1e-6), 1.0 / rmin)
    grad = np.clip(grad, 1.0 / rmax, 1.0 / rmin)
    return (k0 - 1.0) / grad


def _frame(u: np.ndarray, up: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal ``(u, v, w)`` with ``w`` as close to ``up`` as possible."""
    u = u / np.linalg.norm(u)
    up = np.asarray(up, float)
    if abs(np.dot(up, u)) > 0.99:  # along the up vector: any perpendicular will do
        up = np.array([0.0, 1.0, 0.0]) if abs(u[1]) < 0.9 else np.array([0.0, 0.0, 1.0])
    w = up - np.dot(up, u) * u
    w = w / np.linalg.norm(w)
    return u, np.cross(w, u), w


def _dot(d: Points, e: np.ndarray) -> np.ndarray:
    return d[0] * e[0] + d[1] * e[1] + d[2] * e[2]


@dataclass(frozen=True)
class _Part:
    """One primitive: its field, its local bounding box and how smoothly it joins what is already there."""

    fn: Callable[[Points], np.ndarray]
    lo: np.ndarray
    hi: np.ndarray
    blend: float


def _capsule(a, b, ra, rb, blend, up=(1.0, 0.0, 0.0)) -> _Part:
    """Tapered capsule ``a -> b`` with elliptic section ``(r_side, r_up)`` going from ``ra`` to ``rb``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    length = float(np.linalg.norm(b - a))
    u, v, w = _frame(b - a, up)

    def fn(p: Points) -> np.ndarray:
        d = (p[0] - a[0], p[1] - a[1], p[2] - a[2])
        s = _dot(d, u)
        t = np.clip(s / length, 0.0, 1.0)
        rv = ra[0] + (rb[0] - ra[0]) * t
        rw = ra[1] + (rb[1] - ra[1]) * t
        return _ellipsoid((s - t * length, _dot(d, v), _dot(d, w)), (np.minimum(rv, rw), rv, rw))

    r = max(ra[0], ra[1], rb[0], rb[1])
    return _Part(fn, np.minimum(a, b) - r, np.maximum(a, b) + r, blend)


def _plate(centre, axes, half, rounding, blend, bend=0.0, taper=0.0) -> _Part:
    """Rounded box with half extents ``half`` along ``axes`` (rows), optionally bent and tapered.

    ``bend`` curves it: the mid-surface is ``q0 = bend * q1**2`` (edges along ``axes[1]`` bow towards
    ``+axes[0]``). ``taper`` narrows it towards ``+axes[2]``: the half-width along ``axes[1]`` is
    ``half[1] * (1 - taper * q2 / half[2])``.
    """
    c = np.asarray(centre, float)
    ax = np.asarray(axes, float)
    h = np.asarray(half, float)

    def fn(p: Points) -> np.ndarray:
        d = (p[0] - c[0], p[1] - c[1], p[2] - c[2])
        q1 = _dot(d, ax[1])
        q2 = _dot(d, ax[2])
        h1 = h[1] * (1.0 - taper * np.clip(q2 / h[2], -1.0, 1.0)) if taper else h[1]
        q = (
            np.abs(_dot(d, ax[0]) - bend * q1 * q1) - h[0] + rounding,
            np.abs(q1) - h1 + rounding,
            np.abs(q2) - h[2] + rounding,
        )
        outside = np.sqrt(sum(np.maximum(qi, 0) ** 2 for qi in q))
        inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0)
        return outside + inside - rounding

    wide = h[1] * (1.0 + abs(taper))
    extent = np.abs(ax).T @ np.array([h[0] + bend * wide**2, wide, h[2]])
    return _Part(fn, c - extent, c + extent, blend)


# --------------------------------------------------------------------------------------------------
# The vertebra
# --------------------------------------------------------------------------------------------------


def _pedicle_level(m: VertebraMorphometry) -> float:
    """Height (local z) of the pedicles' axis: their top just below the upper endplate at the wall."""
    top_at_wall = m.body_height / 2 - m.body_depth / 2 * math.tan(math.radians(m.body_wedge_deg) / 2)
    return top_at_wall - m.pedicle_height / 2 - 0.5


def superior_joints(m: VertebraMorphometry) -> tuple[FacetJoint, FacetJoint]:
    """The vertebra's superior facet joints (left, right) in its local frame.

    Each sits just behind the end of its pedicle, its plane at the superior facet angle from the
    mid-sagittal plane, facing posteromedially.
    """
    x0, tan_a = _pedicle_start(m)
    lateral = x0 + m.pedicle_length * tan_a + 1.0
    posterior = m.body_depth / 2 + m.pedicle_length + 2.5
    zp = _pedicle_level(m)
    height = (zp - 3.0 + zp + m.pedicle_height / 2 + m.sap_height) / 2
    floor_z = zp + m.pedicle_height / 2 + 0.5
    joints = []
    for side in (1, -1):
        angle = math.radians(m.superior_facet_angle_deg + side * m.facet_tropism_deg / 2)
        joints.append(
            FacetJoint(
                (height, posterior, side * lateral),
                (0.0, math.sin(angle), -side * math.cos(angle)),
                (1.0, 0.0, 0.0),
                (floor_z, posterior - 2.5, side * (lateral - 1.0)),
            )
        )
    return joints[0], joints[1]


def _own_inferior_joints(m: VertebraMorphometry) -> tuple[FacetJoint, FacetJoint]:
    """Inferior joints of a lone vertebra: as if the one below were its copy, a disc height lower."""
    drop = np.array([-(m.body_height + 10.0), 0.0, 0.0])
    joints = []
    for side, joint in zip((1, -1), superior_joints(m), strict=True):
        angle = math.radians(m.inferior_facet_angle_deg + side * m.facet_tropism_deg / 2)
        normal = (0.0, math.sin(angle), -side * math.cos(angle))
        joints.append(
            FacetJoint(
                tuple((np.asarray(joint.centre) + drop).tolist()),
                normal,
                joint.up,
                tuple((np.asarray(joint.floor) + drop).tolist()),
            )
        )
    return joints[0], joints[1]


def _pedicle_start(m: VertebraMorphometry) -> tuple[float, float]:
    """Pedicle axis: lateral position where it leaves the body wall, and its divergence per mm posterior.

    The medial walls are ``canal_width`` apart half-way along the pedicles (the interpedicular distance).
    """
    tan_a = math.tan(math.radians(m.pedicle_angle_deg))
    half_horizontal = m.pedicle_width / 2 / math.cos(math.radians(m.pedicle_angle_deg))
    return m.canal_width / 2 + half_horizontal - m.pedicle_length / 2 * tan_a, tan_a


def _body(m: VertebraMorphometry) -> _Part:
    a = m.body_width / 2
    be = 0.62 * m.body_depth  # superellipse semi-axis, clipped posteriorly by the flat-ish wall
    yc = -m.body_depth / 2 + be
    n = 2.5
    waist = m.waist_concavity / a
    ec = m.endplate_concavity
    cw = m.posterior_wall_concavity
    tw = math.tan(math.radians(m.body_wedge_deg) / 2)
    half_h = m.body_height / 2

    def fn(p: Points) -> np.ndarray:
        z, y, x = p
        sc = 1.0 - waist * np.maximum(0.0, 1.0 - (2.0 * z / m.body_height) ** 2)
        ax_ = np.abs(x / sc) / a + 1e-9
        ay_ = np.abs((y - yc) / sc) / be + 1e-9
        s = ax_**n + ay_**n
        g = s ** (1.0 / n) - 1.0
        grad = s ** (1.0 / n - 1.0) * np.sqrt((ax_ ** (n - 1) / a) ** 2 + (ay_ ** (n - 1) / be) ** 2)
        grad = np.clip(grad, 1.0 / max(a, be), 2.0 / min(a, be))
        f_lat = g / grad * sc
        # the wall is concave: depth_mm at the midline, bulging cw further back at the sides
        f_post = y - (m.body_depth / 2 + cw * (1.0 - np.maximum(0.0, 1.0 - (x / (0.4 * m.body_width)) ** 2)))
        rho2 = (x / a) ** 2 + ((y - yc) / be) ** 2
        dip = ec * np.maximum(0.0, 1.0 - rho2) ** 2
        f_top = z - (half_h - y * tw - dip)
        f_bot = (-half_h + y * tw + dip) - z
        return _round_max(_round_max(f_lat, f_post, 1.5), np.maximum(f_top, f_bot), 2.2)

    reach = half_h + m.body_depth / 2 * abs(tw) + 1
    return _Part(fn, np.array([-reach, -m.body_depth / 2, -a]), np.array([reach, m.body_depth / 2, a]), 0.0)


def _side_parts(m: VertebraMorphometry, side: int, inferior: FacetJoint) -> list[_Part]:
    """Pedicle, lamina, transverse process and articular processes of one side (+1 left, -1 right).

    ``inferior`` is the joint (with the vertebra below) that this side's inferior articular process meets.
    """
    parts: list[_Part] = []
    D, H = m.body_depth, m.body_height
    wall = D / 2
    pw, ph = m.pedicle_width, m.pedicle_height

    def pt(z: float, y: float, x: float) -> np.ndarray:
        return np.array([z, y, side * x])

    # pedicle: medial wall at the canal edge where it leaves the body, diverging posteriorly
    zp = _pedicle_level(m)
    x0, tan_a = _pedicle_start(m)
    y_end = wall + m.pedicle_length
    x_end = x0 + m.pedicle_length * tan_a
    parts.append(
        _capsule(pt(zp, wall - 7, x0 - 7 * tan_a), pt(zp, y_end, x_end), (pw / 2, ph / 2), (pw / 2, ph / 2 + 0.5), 3.0)
    )

    # lamina: plate from the pedicle's end to the midline, its lower edge leaning posteriorly
    t = m.lamina_thickness
    seg_a = np.array([0.0, y_end - 1.0, side * (x_end - 0.5)])
    # the anterior surface crosses the midline canal_depth behind the wall (+0.8 mm for the fillet between
    # the two laminae): find where the mid-surface must cross it, for the lamina's slope
    y_mid = wall + m.canal_depth + t / 2
    for _ in range(3):
        cos_phi = abs(seg_a[2]) / math.hypot(abs(seg_a[2]), y_mid - seg_a[1])
        y_mid = wall + m.canal_depth + 0.8 + t / 2 / cos_phi
    seg_b = np.array([0.0, y_mid + (y_mid - seg_a[1]) * (t / 2) / abs(seg_a[2]), -side * t / 2])
    u = seg_b - seg_a
    u /= np.linalg.norm(u)
    n0 = np.array([0.0, -u[2], u[1]]) * side  # in-plane normal, pointing posteriorly
    if n0[1] < 0:
        n0 = -n0
    beta = math.radians(m.lamina_tilt_deg)
    z_hat = np.array([1.0, 0.0, 0.0])
    v = math.cos(beta) * n0 + math.sin(beta) * z_hat
    w = math.cos(beta) * z_hat - math.sin(beta) * n0
    lam_top = zp + ph / 2 - 1.0
    zc = lam_top - m.lamina_height / 2
    lift = zp - zc  # the mid-surface passes through the segment at pedicle height
    centre = (seg_a + seg_b) / 2 + np.array([zc, 0.0, 0.0]) + n0 * lift * math.tan(beta)
    half_len = float(np.linalg.norm(seg_b - seg_a)) / 2 + 1.0
    parts.append(_plate(centre, (v, u, w), (t / 2, half_len, m.lamina_height / 2), min(2.5, t / 2 - 0.3), 3.0))
    lam_bottom = lam_top - m.lamina_height
    # where the lamina's lower edge lies, a quarter of the way in from its lateral end
    low_point = seg_a + 0.25 * (seg_b - seg_a) + np.array([lam_bottom + 3.0, 0.0, 0.0])
    low_point = low_point + n0 * (zp - low_point[0]) * math.tan(beta)

    # transverse process: from the pedicle-arch junction, lateral, swept back and possibly elevated
    tl = m.transverse_length + side * m.transverse_asymmetry / 2
    sweep, elev = math.radians(m.transverse_angle_deg), math.radians(m.transverse_elevation_deg)
    root = pt(zp + 1.0, y_end - 3.0, x_end + pw / 2 - 3.0)
    direction = np.array([math.sin(elev), math.sin(sweep) * math.cos(elev), side * math.cos(sweep) * math.cos(elev)])
    tip = root + direction * (tl + 3.0)
    tt, th = m.transverse_thickness, m.transverse_height
    parts.append(_capsule(root, tip, (tt * 0.65, th * 0.6), (tt * 0.42, th * 0.45), 2.5))
    if m.transverse_root_forward > 0.5:
        fwd = pt(zp - 1.0, wall - m.transverse_root_forward, x0 + pw / 2 - 1.0)
        parts.append(_capsule(fwd, root + direction * tl * 0.45, (tt * 0.6, th * 0.55), (tt * 0.5, th * 0.5), 3.0))

    # superior articular process: a plate standing on the pedicle's end, its facet facing the joint
    joint = superior_joints(m)[0 if side > 0 else 1]
    normal, up = np.asarray(joint.normal), np.asarray(joint.up)
    along = np.cross(up, normal)
    bend = 1.0 / 36.0  # facets curve (radius ~18 mm), the superior one concave towards the joint
    sap_bottom, sap_top = zp - 3.0, zp + ph / 2 + m.sap_height
    sap_centre = np.asarray(joint.centre) - normal * (m.facet_gap / 2 + m.sap_thickness / 2)
    parts.append(
        _plate(
            sap_centre,
            (normal, along, up),
            (m.sap_thickness / 2, m.sap_width / 2, (sap_top - sap_bottom) / 2),
            2.2,
            2.5,
            bend,
            taper=0.25,
        )
    )
    # mammillary process: a small tubercle on the SAP's posterior border
    back = along if along[1] > 0 else -along
    mam = sap_centre + back * (m.sap_width / 2 - 1.0) - normal * 1.0 + np.array([1.0, 0.0, 0.0])
    parts.append(_capsule(mam - np.array([3.0, 0, 0]), mam + np.array([3.0, 0, 0]), (2.5, 2.5), (2.5, 2.5), 1.5))

    # inferior articular process: hangs from the lamina, behind/medial to the joint below, parallel to it
    normal_i, up_i = np.asarray(inferior.normal), np.asarray(inferior.up)
    along_i = np.cross(up_i, normal_i)
    iap_top = lam_bottom + 7.0
    iap_bottom = max(-H / 2 - m.iap_drop, inferior.floor[0] + 3.0)
    off = m.facet_gap / 2 + m.iap_thickness / 2
    base = np.asarray(inferior.centre) + normal_i * off
    iap_centre = base + up_i * (((iap_top + iap_bottom) / 2 - base[0]) / up_i[0])
    parts.append(
        _plate(
            iap_centre,
            (normal_i, along_i, up_i),
            (m.iap_thickness / 2, m.iap_width / 2, (iap_top - iap_bottom) / 2),
            2.5,
            2.5,
            bend,
            taper=-0.3,
        )
    )
    # pars interarticularis: joins the lamina's lower edge to the top of the inferior articular process
    parts.append(
        _capsule(
            low_point, iap_centre + np.array([(iap_top - iap_bottom) / 2 - 3.0, 0, 0]), (3.5, 4.0), (3.5, 4.0), 2.5
        )
    )
    return parts


def _spinous(m: VertebraMorphometry) -> _Part:
    """Hatchet-shaped spinous process: a plate in the mid-sagittal plane, quadrilateral in side view."""
    wall = m.body_depth / 2
    zp = _pedicle_level(m)
    lam_top = zp + m.pedicle_height / 2 - 1.0
    z_root = lam_top - m.lamina_height / 2 + 1.0
    y_root = wall + m.canal_depth + m.lamina_thickness * 0.5
    y_tip = wall + m.spinous_length
    span = y_tip - y_root
    tan_c = math.tan(math.radians(m.spinous_tilt_deg))
    flare = 0.1 * m.spinous_height / 2 / span  # taller at the tip than at the root
    tan_up, tan_lo = tan_c - flare, tan_c + flare
    half_tip = m.spinous_height / 2
    z_tip = z_root - span * tan_c
    cos_up, cos_lo = 1 / math.sqrt(1 + tan_up**2), 1 / math.sqrt(1 + tan_lo**2)
    thick = m.spinous_thickness

    def fn(p: Points) -> np.ndarray:
        z, y, x = p
        # upper border through (y_tip, z_tip + half_tip) with slope -tan_up, lower one likewise
        f_up = ((z - (z_tip + half_tip)) + (y - y_tip) * tan_up) * cos_up
        f_lo = ((z_tip - half_tip) - z - (y - y_tip) * tan_lo) * cos_lo
        f_back = y - y_tip
        f_front = (y_root - 1.0) - y
        side_view = _round_max(_round_max(f_up, f_back, 3.0), _round_max(f_lo, f_back, 3.0), 0.0)
        side_view = np.maximum(side_view, f_front)
        frac = np.clip((y - y_root) / span, 0.0, 1.0)
        f_thick = np.abs(x) - (thick / 2 + 1.0 * frac)
        return _round_max(side_view, f_thick, min(2.5, thick / 2 - 0.5))

    z_hi = z_root + half_tip + 4 * abs(tan_c) + 2
    z_lo = z_tip - half_tip - 2
    r = thick / 2 + 1.5
    return _Part(fn, np.array([z_lo, y_root - 5, -r]), np.array([z_hi, y_tip + 1, r]), 3.0)


def vertebra_parts(m: VertebraMorphometry, inferior_joints: tuple[FacetJoint, FacetJoint] | None = None) -> list[_Part]:
    """The primitives of one vertebra in its local frame, in blending order.

    ``inferior_joints`` (left, right): where the inferior articular processes meet the vertebra below, in
    this vertebra's frame; None places them as if the vertebra below were a copy of this one.
    """
    left, right = inferior_joints if inferior_joints is not None else _own_inferior_joints(m)
    return [_body(m), *_side_parts(m, +1, left), *_side_parts(m, -1, right), _spinous(m)]


# --------------------------------------------------------------------------------------------------
# Rendering onto a grid
# --------------------------------------------------------------------------------------------------


def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix (local -> grid directions) from angles (degrees) about array axes 0 (S), 1 (P), 2 (L).

    ``R = R0 @ R1 @ R2``: the rotation about axis 2 acts first. A positive angle about axis 2 tilts the
    superior axis towards posterior (lordosis tilts L5's superior axis anteriorly: a negative angle).
    """
    a0, a1, a2 = (math.radians(float(a)) for a in rotation_deg)

    def rot(i: int, j: int, ang: float) -> np.ndarray:
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(ang)
        r[j, i] = math.sin(ang)
        r[i, j] = -math.sin(ang)
        return r

    # about axis 0 turns posterior (1) towards left (2); about 1 turns left (2) towards superior (0);
    # about 2 turns superior (0) towards posterior (1)
    return rot(1, 2, a0) @ rot(2, 0, a1) @ rot(0, 1, a2)


def _local_box(parts: Sequence[_Part], margin: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.min([p.lo for p in parts], axis=0) - margin
    hi = np.max([p.hi for p in parts], axis=0) + margin
    return lo, hi


def _world_box(lo: np.ndarray, hi: np.ndarray, rot: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[(lo, hi)[b >> k & 1][k] for k in range(3)] for b in range(8)])
    world = corners @ rot.T + centre
    return world.min(axis=0), world.max(axis=0)


def _index_box(
    w_lo: np.ndarray, w_hi: np.ndarray, spacing: float, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    i_lo = np.maximum(np.floor(w_lo / spacing).astype(int), 0)
    i_hi = np.minimum(np.ceil(w_hi / spacing).astype(int) + 1, np.asarray(shape))
    return i_lo, i_hi


def _local_points(i_lo, i_hi, spacing: float, rot: np.ndarray, centre: np.ndarray) -> Points:
    axes = [(np.arange(i_lo[a], i_hi[a], dtype=np.float32) * spacing - centre[a]) for a in range(3)]
    g0 = axes[0][:, None, None]
    g1 = axes[1][None, :, None]
    g2 = axes[2][None, None, :]
    # local = rot.T @ world offset, component c = sum_a rot[a, c] * offset_a
    return tuple(
        (g0 * np.float32(rot[0, c]) + g1 * np.float32(rot[1, c]) + g2 * np.float32(rot[2, c])).astype(np.float32)
        for c in range(3)
    )


def _surface_noise(points: Points, amplitude: float, rng: np.random.Generator, modes: int = 10) -> np.ndarray:
    """Smooth random bumps (sum of plane waves, wavelengths 12-40 mm) with standard deviation ``amplitude``."""
    dirs = rng.standard_normal((modes, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    waves = 2 * np.pi / rng.uniform(12.0, 40.0, modes)
    phases = rng.uniform(0, 2 * np.pi, modes)
    out = np.zeros_like(points[0])
    for d, k, ph in zip(dirs, waves, phases, strict=True):
        out += np.cos((points[0] * d[0] + points[1] * d[1] + points[2] * d[2]) * k + ph)
    return out * np.float32(amplitude * math.sqrt(2.0 / modes))


def _vertebra_field(
    m: VertebraMorphometry,
    rot: np.ndarray,
    centre: np.ndarray,
    spacing: float,
    shape: Sequence[int],
    *,
    inferior_joints: tuple[FacetJoint, FacetJoint] | None = None,
    noise_mm: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Signed distance field (mm, negative inside) of a vertebra on its bounding box of a grid.

    ``centre`` is the body centre in grid mm (array-axis order, relative to voxel (0, 0, 0)); ``rot`` maps
    local to grid directions. Returns the box's slices and the field there.
    """
    parts = vertebra_parts(m, inferior_joints)
    b_lo, b_hi = _index_box(*_world_box(*_local_box(parts, 3.0), rot, centre), spacing, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(b_lo, b_hi, strict=True))
    field_ = np.full(tuple(int(n) for n in b_hi - b_lo), _BIG, dtype=np.float32)
    if field_.size == 0:
        return box, field_
    for part in parts:
        p_lo, p_hi = _index_box(
            *_world_box(part.lo - part.blend - 3.0, part.hi + part.blend + 3.0, rot, centre), spacing, shape
        )
        p_lo, p_hi = np.maximum(p_lo, b_lo), np.minimum(p_hi, b_hi)
        if np.any(p_hi <= p_lo):
            continue
        sub = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(p_lo, p_hi, b_lo, strict=True))
        values = part.fn(_local_points(p_lo, p_hi, spacing, rot, centre)).astype(np.float32)
        field_[sub] = _smin(field_[sub], values, part.blend)
    if noise_mm > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        band = np.nonzero(np.abs(field_) < 4.0 * noise_mm + 1.0)
        offset = np.stack(band, axis=1).astype(np.float32) * spacing + (b_lo * spacing - centre).astype(np.float32)
        local = offset @ rot.astype(np.float32)  # rows: local = rot.T @ offset
        field_[band] += _surface_noise((local[:, 0], local[:, 1], local[:, 2]), noise_mm, rng)
    return box, field_


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def render_vertebra(
    m: VertebraMorphometry,
    *,
    spacing: float = 1.0,
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    center_mm: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    surface_noise_mm: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Binary mask of one vertebra on an isotropic grid in working-grid orientation.

    ``center_mm`` places the body centre, in mm from voxel (0, 0, 0) along array axes (0, 1, 2); default:
    the middle of the grid. ``shape`` defaults to the smallest grid holding the rotated vertebra with a
    5 mm margin (the body centre then sits where the vertebra fits). ``surface_noise_mm`` adds smooth random
    bumps (seeded by ``seed``). The mask is one 26-connected component.
    """
    rot = rotation_matrix(rotation_deg)
    if shape is None:
        w_lo, w_hi = _world_box(*_local_box(vertebra_parts(m), 5.0), rot, np.zeros(3))
        shape = tuple(int(n) for n in np.ceil((w_hi - w_lo) / spacing) + 1)
        centre = -w_lo if center_mm is None else np.asarray(center_mm, float)
    else:
        centre = (np.asarray(shape) - 1) * spacing / 2 if center_mm is None else np.asarray(center_mm, float)
    out = np.zeros(tuple(int(n) for n in shape), dtype=bool)
    box, f = _vertebra_field(
        m, rot, centre, spacing, out.shape, noise_mm=surface_noise_mm, rng=np.random.default_rng(seed)
    )
    out[box] = f < 0
    return _largest_component(out)


# --------------------------------------------------------------------------------------------------
# Whole spines
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpinePlan:
    """Everything :func:`synth_spine` sampled for one spine (for inspection and tests)."""

    morphometry: tuple[VertebraMorphometry, ...]
    rotations_deg: tuple[tuple[float, float, float], ...]
    inferior_joints: tuple[tuple[FacetJoint, FacetJoint] | None, ...]  # see vertebra_parts
    centres_mm: tuple[tuple[float, float, float], ...]  # body centres, grid mm from voxel (0,0,0)
    lordosis_deg: float  # L1-S1 (the L5-S1 segment's share is implied, not rendered)
    discs_mm: tuple[float, ...]
    surface_noise_mm: tuple[float, ...]
    shape: tuple[int, int, int]
    spacing: float
    seed: int


_SEGMENT_WEIGHTS = np.array([0.10, 0.15, 0.20, 0.25, 0.30])  # share of L1-S1 lordosis per segment


def plan_spine(
    seed: int,
    *,
    levels: Sequence[str] = LEVELS,
    spacing: float = 1.0,
    margin_mm: float = 12.0,
    lordosis_deg: tuple[float, float] = (40.0, 60.0),
    disc_mm: tuple[float, float] = (8.0, 12.0),
    jitter_deg: float = 2.0,
    surface_noise_mm: tuple[float, float] = (0.2, 0.7),
) -> SpinePlan:
    """Sample the vertebrae, their poses and the grid of one spine (see :func:`synth_spine`)."""
    idx = sorted(_level_index(lv) for lv in levels)
    if not idx or idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError(f"levels must be consecutive lumbar levels, got {list(levels)}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    size_z = float(np.clip(rng.standard_normal(), -2.0, 2.0))
    all_m = [sample_morphometry(lv, rng, size_factor=size_z) for lv in LEVELS]
    # facets articulate: each inferior facet has the angle of the superior facet below (and its position,
    # set from the poses below)
    for i in range(len(LEVELS) - 1):
        below = all_m[i + 1]
        all_m[i] = replace(
            all_m[i],
            inferior_facet_angle_deg=below.superior_facet_angle_deg,
            facet_tropism_deg=below.facet_tropism_deg,
        )
    lordosis = float(rng.uniform(*lordosis_deg))
    weights = _SEGMENT_WEIGHTS * rng.uniform(0.8, 1.2, 5)
    weights /= weights.sum()
    seg = lordosis * weights  # L1-L2 .. L5-S1
    # sagittal angle of each vertebra's superior axis (negative = tilted anteriorly), L3 about upright
    tilt = np.concatenate([[0.0], np.cumsum(seg[:4])])
    tilt = -(tilt - tilt[2]) + rng.normal(0.0, 3.0)
    discs = rng.uniform(*disc_mm, 4)
    jit = rng.normal(0.0, jitter_deg / 2, (5, 3)).clip(-jitter_deg, jitter_deg)
    coronal = rng.normal(0.0, 1.5, 5)
    noise = rng.uniform(*surface_noise_mm, 5)

    rots = [rotation_matrix((jit[i, 0], jit[i, 1] + coronal[i], tilt[i] + jit[i, 2])) for i in range(5)]
    centres = [np.zeros(3)]
    for i in range(4):
        up_a, up_b = rots[i][:, 0], rots[i + 1][:, 0]
        axis = (up_a + up_b) / np.linalg.norm(up_a + up_b)
        bottom = centres[i] - up_a * all_m[i].body_height / 2
        c = bottom - axis * discs[i] - up_b * all_m[i + 1].body_height / 2
        # line up the posterior body walls
        c = c + rots[i + 1][:, 1] * (all_m[i].body_depth - all_m[i + 1].body_depth) / 2
        c = c + rng.normal(0.0, 0.5, 3) * np.array([0.0, 1.0, 1.0])
        centres.append(c)
    # each inferior articular process meets the superior one below, parallel to it: that joint in this frame
    joints: list[tuple[FacetJoint, FacetJoint] | None] = []
    for i in range(5):
        if i == 4:
            joints.append(None)
            continue
        rot = rots[i].T @ rots[i + 1]
        shift = rots[i].T @ (centres[i + 1] - centres[i])
        left, right = superior_joints(all_m[i + 1])
        joints.append((left.moved(rot, shift), right.moved(rot, shift)))

    keep = list(range(idx[0], idx[-1] + 1))
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for i in keep:
        w_lo, w_hi = _world_box(*_local_box(vertebra_parts(all_m[i], joints[i]), 0.0), rots[i], centres[i])
        lo, hi = np.minimum(lo, w_lo), np.maximum(hi, w_hi)
    lo -= margin_mm
    hi += margin_mm
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing) + 1)
    # angles back from the matrices are not needed: store the sampled ones
    rot_deg = tuple((float(jit[i, 0]), float(jit[i, 1] + coronal[i]), float(tilt[i] + jit[i, 2])) for i in keep)
    return SpinePlan(
        morphometry=tuple(all_m[i] for i in keep),
        rotations_deg=rot_deg,
        inferior_joints=tuple(joints[i] for i in keep),
        centres_mm=tuple(tuple(float(v) for v in centres[i] - lo) for i in keep),
        lordosis_deg=lordosis,
        discs_mm=tuple(float(d) for d in discs),
        surface_noise_mm=tuple(float(noise[i]) for i in keep),
        shape=shape,  # type: ignore[arg-type]
        spacing=float(spacing),
        seed=int(seed),
    )


def render_spine(plan: SpinePlan, *, gap_mm: float | None = None) -> np.ndarray:
    """Label array (uint8, VerSe ids) of a planned spine, vertebrae separated by at least one voxel."""
    s = plan.spacing
    gap = 2.0 * s if gap_mm is None else float(gap_mm)
    best = np.full(plan.shape, _BIG, np.float32)
    second = np.full(plan.shape, _BIG, np.float32)
    owner = np.zeros(plan.shape, np.uint8)
    seed = plan.seed
    for n, (m, rdeg, c, amp, joints) in enumerate(
        zip(
            plan.morphometry,
            plan.rotations_deg,
            plan.centres_mm,
            plan.surface_noise_mm,
            plan.inferior_joints,
            strict=True,
        )
    ):
        rng = np.random.default_rng([seed, 0xB0B, n])
        box, f = _vertebra_field(
            m, rotation_matrix(rdeg), np.asarray(c), s, plan.shape, inferior_joints=joints, noise_mm=amp, rng=rng
        )
        b, sec, own = best[box], second[box], owner[box]
        lower = f < b
        sec[:] = np.where(lower, b, np.minimum(sec, f))
        b[:] = np.where(lower, f, b)
        own[:] = np.where(lower, label_for_level(m.level), own)
    labels = np.where((best < 0) & (second - best > gap), owner, 0).astype(np.uint8)
    # no two labels may touch (26-neighbourhood), and each vertebra is one piece
    out = np.zeros_like(labels)
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
        sub = labels[box]
        others = (sub > 0) & (sub != label)
        mask = (sub == label) & ~ndimage.binary_dilation(others, structure=np.ones((3, 3, 3), bool))
        out[box][_largest_component(mask)] = label
    return out


def synth_spine(
    seed: int,
    *,
    levels: Sequence[str] = LEVELS,
    spacing: float = 1.0,
    margin_mm: float = 12.0,
) -> Volume:
    """A whole lumbar spine phantom: labels 20..24 (L1..L5) on an identity-direction isotropic grid.

    Lordosis (L1-S1) is drawn from 40-60 degrees and shared out over the segments (more caudally), discs
    8-12 mm, every vertebra gets small random rotations (<= 2 degrees about each axis) and a slight coronal
    tilt; one person-size factor scales the whole spine. Posterior body walls line up, each inferior
    articular process faces the superior one below across a 2.5 mm joint space, and wherever vertebrae
    would still touch a gap of at least one voxel is carved (26-neighbourhood). L1 is superior (larger array
    index along axis 0). The grid's centre is at LPS (0, 0, 0). Deterministic for ``seed``; a vertebra is the
    same whichever ``levels`` are asked for (all five are always sampled).
    """
    plan = plan_spine(seed, levels=levels, spacing=spacing, margin_mm=margin_mm)
    labels = render_spine(plan)
    return Volume(labels, _identity_geometry(plan.shape, spacing))


def _identity_geometry(shape: Sequence[int], spacing: float, corner_mm: Sequence[float] | None = None) -> Geometry:
    """Identity-direction grid; ``corner_mm`` = LPS (x, y, z) of voxel (0,0,0), default centres the grid."""
    nz, ny, nx = (int(n) for n in shape)
    if corner_mm is None:
        corner_mm = (-(nx - 1) * spacing / 2, -(ny - 1) * spacing / 2, -(nz - 1) * spacing / 2)
    return Geometry((nz, ny, nx), (spacing, spacing, spacing), tuple(float(v) for v in corner_mm))


def crop_patch(volume: Volume, label: int, size: int = PATCH_SIZE) -> Volume:
    """Binary (uint8) ``size``^3 patch of one label around its centre of mass, zero-padded.

    Placed as the refine pipeline places it (:func:`vertrefine.spatial.patch_box`), on the volume's own grid.
    """
    from .spatial import crop, patch_box

    mask = volume.array == label
    if not mask.any():
        raise ValueError(f"label {label} is not in the volume")
    box = patch_box(ndimage.center_of_mass(mask), size)
    patch = crop(mask.view(np.uint8), box)
    g = volume.geometry
    corner = g.index_to_physical(np.asarray(box.start[::-1], dtype=float))
    return Volume(patch, Geometry((size,) * 3, g.spacing, tuple(corner), g.direction))


def synth_patches(seed: int, *, levels: Sequence[str] = LEVELS, size: int = PATCH_SIZE) -> list[tuple[str, Volume]]:
    """Single-vertebra ``size``^3 1 mm binary patches (uint8) from the spine of ``seed``, one per level.

    Each patch holds only its own vertebra (posed as in the spine: lordotic tilt included), centred on its
    centre of mass, as :func:`crop_patch` places it.
    """
    spine = synth_spine(seed, levels=levels, spacing=1.0)
    return [(level_name(lab), crop_patch(spine, lab, size)) for lab in spine.labels]


# --------------------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------------------


def synth_case_paths(
    out_dir: str | Path, seed: int, *, patches: bool = False, levels: Sequence[str] = LEVELS
) -> list[Path]:
    """File names of one case: ``spine_SSSSS.nii.gz``, or ``spine_SSSSS_L1.nii.gz``.. for patches."""
    out_dir = Path(out_dir)
    if not patches:
        return [out_dir / f"spine_{seed:05d}.nii.gz"]
    return [out_dir / f"spine_{seed:05d}_{LEVELS[i]}.nii.gz" for i in sorted(_level_index(lv) for lv in levels)]


def write_synth_dataset(
    out_dir: str | Path,
    cases: int,
    seed: int,
    *,
    patches: bool = False,
    overwrite: bool = False,
    levels: Sequence[str] = LEVELS,
    on_case: Callable[[], object] | None = None,
) -> list[Path]:
    """Write ``cases`` spines (or their per-vertebra patches) as NIfTI; case ``i`` uses seed ``seed + i``.

    Names: ``spine_{seed:05d}.nii.gz`` (whole spine, labels 20..24) or ``spine_{seed:05d}_{level}.nii.gz``
    (one binary 128^3 patch per level). Datasets with disjoint seed ranges therefore never share a case.
    Existing files are kept unless ``overwrite``. Returns the files written. ``out_dir`` is created if
    missing; a file in its place raises :class:`~vertrefine.errors.OutputError`.
    """
    from .io import write_label_map  # lazy: io pulls in the DICOM stack

    if cases < 0 or seed < 0:
        raise ValueError(f"cases and seed must be non-negative, got {cases} and {seed}")
    out_dir = make_folder(out_dir, "the phantoms")
    written: list[Path] = []
    for i in range(int(cases)):
        case_seed = int(seed) + i
        paths = synth_case_paths(out_dir, case_seed, patches=patches, levels=levels)
        if overwrite or not all(p.exists() for p in paths):
            if patches:
                for path, (_, patch) in zip(paths, synth_patches(case_seed, levels=levels), strict=True):
                    if overwrite or not path.exists():
                        write_label_map(patch, path)
                        written.append(path)
            else:
                write_label_map(synth_spine(case_seed, levels=levels), paths[0])
                written.append(paths[0])
        if on_case is not None:
            on_case()
    return written


__all__ = [
    "FacetJoint",
    "LEVELS",
    "MORPHOMETRY_RANGES",
    "PATCH_SIZE",
    "SpinePlan",
    "VOLUME_RANGE_CM3",
    "VertebraMorphometry",
    "crop_patch",
    "plan_spine",
    "render_spine",
    "render_vertebra",
    "rotation_matrix",
    "sample_morphometry",
    "superior_joints",
    "synth_case_paths",
    "synth_patches",
    "synth_spine",
    "vertebra_parts",
    "write_synth_dataset",
]
