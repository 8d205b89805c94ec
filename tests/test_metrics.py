"""Metrics against hand computations: offset spheres, shifted boxes (closed form), edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from vertrefine.metrics import (
    METRIC_KEYS,
    confusion_counts,
    metrics_from_counts,
    overlap_metrics,
    surface_distances,
    vertebra_metrics,
)


def _expected_overlap(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Appendix D written out independently: base-2 logs, explicit sums over the 2x2 table."""
    n = tp + fp + fn + tn
    joint = {(1, 1): tp / n, (1, 0): fp / n, (0, 1): fn / n, (0, 0): tn / n}
    pa = {1: (tp + fp) / n, 0: (fn + tn) / n}  # prediction
    pb = {1: (tp + fn) / n, 0: (fp + tn) / n}  # truth
    mi = sum(p * math.log2(p / (pa[a] * pb[b])) for (a, b), p in joint.items() if p > 0)
    ha = -sum(p * math.log2(p) for p in pa.values() if p > 0)
    hb = -sum(p * math.log2(p) for p in pb.values() if p > 0)
    po = (tp + tn) / n
    pe = sum(pa[c] * pb[c] for c in (0, 1))
    a, b = tp + fp, tp + fn
    return {
        "dsc": 2 * tp / (a + b),
        "vs": 1 - abs(a - b) / (a + b),
        "sen": tp / (tp + fn),
        "spec": tn / (tn + fp),
        "nmi": 2 * mi / (ha + hb),
        "ck": (po - pe) / (1 - pe),
    }


def _assert_metrics(got: dict[str, float], expected: dict[str, float], tol: float = 1e-12) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=tol), key


# ------------------------------------------------------------------------------------------ spheres


def _sphere(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    k, j, i = np.indices(shape, dtype=float)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def test_offset_spheres_match_hand_counts_and_analytic_overlap() -> None:
    shape, radius, offset = (48, 48, 48), 11.0, 7.0
    c_gt = (23.3, 24.1, 23.7)
    c_pred = (c_gt[0] + offset, c_gt[1], c_gt[2])
    gt, pred = _sphere(shape, c_gt, radius), _sphere(shape, c_pred, radius)

    # Hand counts: voxel centres inside both / one / neither sphere, from the distance inequalities.
    k, j, i = np.indices(shape, dtype=float)
    in_gt = (k - c_gt[0]) ** 2 + (j - c_gt[1]) ** 2 + (i - c_gt[2]) ** 2 <= radius**2
    in_pred = (k - c_pred[0]) ** 2 + (j - c_pred[1]) ** 2 + (i - c_pred[2]) ** 2 <= radius**2
    tp = int(np.sum(in_gt * in_pred))
    fp = int(np.sum(in_pred * ~in_gt))
    fn = int(np.sum(in_gt * ~in_pred))
    tn = int(np.prod(shape)) - tp - fp - fn
    assert confusion_counts(pred, gt) == (tp, fp, fn, tn)
    got = overlap_metrics(pred, gt)
    _assert_metrics(got, _expected_overlap(tp, fp, fn, tn))

    # Analytic: lens volume of two equal spheres at distance d, V = pi (4r + d)(2r - d)^2 / 12.
    lens = math.pi * (4 * radius + offset) * (2 * radius - offset) ** 2 / 12
    ball = 4 / 3 * math.pi * radius**3
    assert got["dsc"] == pytest.approx(lens / ball, abs=0.015)
    assert got["vs"] == pytest.approx(1.0, abs=0.01)  # equal spheres: equal volumes up to sampling


# ------------------------------------------------------------------------------------------ shifted boxes

SHAPE = (20, 16, 18)
T, D = 10, 3  # box thickness along z and the shift of the prediction along z (voxels)
NY, NX = 10, 11


def _box(z0: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[z0 : z0 + T, 3 : 3 + NY, 4 : 4 + NX] = True
    return mask


def _shifted_box_distances(spacing: tuple[float, float, float]) -> np.ndarray:
    """Closed form of the directed surface distances of a T x NY x NX box shifted by D along z.

    Pred voxel (l, y, x) local to its box, at gt-local height z = D + l. Rim columns (on the lateral faces):
    distance 0 while z <= T - 1 (they lie on the truth's lateral faces), else (z - T + 1) sz to the truth's
    top face. Inner columns have surface voxels only at the top (D sz above the truth's top face) and the
    bottom (inside the truth: the nearest of the truth's bottom face, top face and lateral faces).
    By the mirror symmetry z -> T - 1 + D - z the gt->pred distances are the same multiset.
    """
    sz, sy, sx = spacing
    y, x = np.meshgrid(np.arange(NY), np.arange(NX), indexing="ij")
    rim = (y == 0) | (y == NY - 1) | (x == 0) | (x == NX - 1)
    distances = []
    for level in range(T):
        z = D + level
        distances += [0.0 if z <= T - 1 else (z - T + 1) * sz] * int(rim.sum())
    inner_y, inner_x = y[~rim], x[~rim]
    distances += [D * sz] * inner_y.size  # top face
    in_plane = np.minimum(np.minimum(inner_y, NY - 1 - inner_y) * sy, np.minimum(inner_x, NX - 1 - inner_x) * sx)
    distances += list(np.minimum(min(D * sz, (T - 1 - D) * sz), in_plane))  # bottom face
    return np.asarray(distances, dtype=float)


def test_shifted_boxes_overlap_closed_form() -> None:
    gt, pred = _box(2), _box(2 + D)
    area, n = NY * NX, int(np.prod(SHAPE))
    tp, fp, fn = (T - D) * area, D * area, D * area
    tn = n - tp - fp - fn
    got = overlap_metrics(pred, gt)
    assert got["dsc"] == pytest.approx((T - D) / T)
    assert got["vs"] == 1.0
    assert got["sen"] == pytest.approx((T - D) / T)
    assert got["spec"] == pytest.approx(tn / (tn + fp))
    po = (tp + tn) / n
    pe = ((T * area) ** 2 + (n - T * area) ** 2) / n**2
    assert got["ck"] == pytest.approx((po - pe) / (1 - pe), abs=1e-12)
    # NMI = 2 I / (H(A) + H(B)) with H(A) = H(B) = h(p), I = 2 h(p) - H(joint).
    p = T * area / n
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    h_joint = -sum(q * math.log(q) for q in (tp / n, fp / n, fn / n, tn / n))
    assert got["nmi"] == pytest.approx(2 * (2 * h - h_joint) / (2 * h), abs=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.8, 1.3), (0.7, 3.0, 0.5)])
def test_shifted_boxes_surface_distances_closed_form(spacing: tuple[float, float, float]) -> None:
    expected = _shifted_box_distances(spacing)
    hd95, assd = surface_distances(_box(2 + D), _box(2), spacing)
    assert hd95 == pytest.approx(float(np.percentile(expected, 95)), abs=1e-9)
    assert assd == pytest.approx(float(expected.mean()), abs=1e-9)
    # Symmetric in its arguments.
    assert surface_distances(_box(2), _box(2 + D), spacing) == pytest.approx((hd95, assd))


def test_single_voxels_anisotropic_distance() -> None:
    pred, gt = np.zeros((4, 5, 9), bool), np.zeros((4, 5, 9), bool)
    pred[1, 2, 1], gt[1, 2, 6] = True, True
    assert surface_distances(pred, gt, (3.0, 1.0, 2.0)) == (10.0, 10.0)  # 5 voxels along x at 2 mm
    assert surface_distances(pred, gt, (1.0, 1.0, 0.5)) == (2.5, 2.5)


# ------------------------------------------------------------------------------------------ brute force


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a 6-neighbour outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _brute_distances(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    sp = np.asarray(np.nonzero(_brute_surface(pred))).T * spacing
    sg = np.asarray(np.nonzero(_brute_surface(gt))).T * spacing
    d_pg, _ = cKDTree(sg).query(sp)
    d_gp, _ = cKDTree(sp).query(sg)
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    return float(hd95), float(np.concatenate([d_pg, d_gp]).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_match_brute_force_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (24, 30, 28)
    field_a = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    field_b = field_a + 0.05 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    pred, gt = field_a > 0.02, field_b > 0.0  # irregular, several components, touching the borders
    assert pred.any() and gt.any() and pred[0].any()
    spacing = (2.5, 0.9, 1.1)
    got = surface_distances(pred, gt, spacing)
    assert got == pytest.approx(_brute_distances(pred, gt, spacing), abs=1e-9)


def test_bounding_box_crop_changes_nothing() -> None:
    gt = np.zeros((40, 40, 40), bool)
    gt[10:20, 12:18, 14:25] = True
    pred = np.roll(gt, (2, -1, 3), axis=(0, 1, 2))
    spacing = (1.5, 1.0, 0.75)
    assert surface_distances(pred, gt, spacing) == pytest.approx(_brute_distances(pred, gt, spacing), abs=1e-9)


# ------------------------------------------------------------------------------------------ edge cases


def test_identical_masks_are_perfect() -> None:
    mask = _box(4)
    got = vertebra_metrics(mask, mask, (1.0, 2.0, 0.5))
    assert set(got) == set(METRIC_KEYS)
    assert got == {
        "dsc": 1.0,
        "vs": 1.0,
        "sen": 1.0,
        "spec": 1.0,
        "nmi": 1.0,
        "ck": 1.0,
        "hd95_mm": 0.0,
        "assd_mm": 0.0,
    }


def test_empty_prediction_against_truth() -> None:
    got = vertebra_metrics(np.zeros(SHAPE, bool), _box(2), (1.0, 1.0, 1.0))
    assert got == {
        "dsc": 0.0,
        "vs": 0.0,
        "sen": 0.0,
        "spec": 1.0,
        "nmi": 0.0,
        "ck": 0.0,
        "hd95_mm": None,
        "assd_mm": None,
    }


def test_prediction_without_truth() -> None:
    got = vertebra_metrics(_box(2), np.zeros(SHAPE, bool), (1.0, 1.0, 1.0))
    assert (got["dsc"], got["vs"], got["nmi"], got["ck"]) == (0.0, 0.0, 0.0, 0.0)
    assert got["sen"] == 1.0  # vacuous: no true voxels to miss
    assert got["spec"] < 1.0
    assert (got["hd95_mm"], got["assd_mm"]) == (None, None)


def test_both_empty_is_perfect_agreement_without_distances() -> None:
    empty = np.zeros(SHAPE, bool)
    got = vertebra_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert all(got[key] == 1.0 for key in ("dsc", "vs", "sen", "spec", "nmi", "ck"))
    assert (got["hd95_mm"], got["assd_mm"]) == (None, None)


def test_constant_masks() -> None:
    full, empty = np.ones(SHAPE, bool), np.zeros(SHAPE, bool)
    assert overlap_metrics(full, full) == {k: 1.0 for k in ("dsc", "vs", "sen", "spec", "nmi", "ck")}
    opposite = overlap_metrics(full, empty)
    assert (opposite["dsc"], opposite["nmi"], opposite["ck"]) == (0.0, 0.0, 0.0)


def test_disjoint_masks() -> None:
    gt, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    gt[2:5, 2:6, 2:6], pred[10:13, 2:6, 2:6] = True, True
    tp, fp, fn, tn = confusion_counts(pred, gt)
    assert (tp, fp, fn) == (0, 48, 48)
    got = overlap_metrics(pred, gt)
    _assert_metrics(got, _expected_overlap(tp, fp, fn, tn))
    assert got["dsc"] == 0.0 and got["sen"] == 0.0 and got["ck"] < 0.0
    # Every surface voxel's nearest partner is straight along z (2 mm voxels): the 16 voxels of the facing
    # face at 6 voxels, the 12 rim voxels of the middle layer at 7, the 16 of the far face at 8.
    hd95, assd = surface_distances(pred, gt, (2.0, 1.0, 1.0))
    assert hd95 == pytest.approx(16.0)
    assert assd == pytest.approx((16 * 12 + 12 * 14 + 16 * 16) / 44)


def test_metrics_from_counts_matches_independent_formulas() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        tp, fp, fn, tn = (int(v) for v in rng.integers(1, 10**6, size=4))
        _assert_metrics(metrics_from_counts(tp, fp, fn, tn), _expected_overlap(tp, fp, fn, tn), tol=1e-9)


def test_counts_use_int64_on_large_masks() -> None:
    big = np.ones((300, 300, 300), dtype=bool)  # (27e6)^2 overflows int32 and is inexact in float32
    assert confusion_counts(big, big) == (27_000_000, 0, 0, 0)
    assert overlap_metrics(big, big)["ck"] == 1.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shape"):
        overlap_metrics(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(_box(2), _box(3), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(_box(2), _box(3), (1.0, 0.0, 1.0))
