"""The QC preview: each vertebra seen through its own centre, input and refined outlines, levels named.

Rows: a sagittal view, a coronal view and one axial view per vertebra. The sagittal (coronal) view is
stitched from bands, one per vertebra between the midpoints to its neighbours, each cut through that
vertebra's own centre of mass, so a curved or tilted spine shows every vertebra at its middle rather than
whatever a single plane through the volume's centre happens to cross. The input's outlines are drawn in
orange, the result's in cyan, over the result's mask, on the one 1 mm working grid both live on, zoomed onto
the structures (axial views onto their own vertebra). Each vertebra's level is written at the right edge of
the view, level with its centre; a vertebra that was kept as input or flagged is named in red with what
happened to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path

INPUT_COLOUR = "#ff8c00"
REFINED_COLOUR = "#00d0ff"
FLAG_COLOUR = "#ff3030"


@dataclass(frozen=True)
class QcVertebra:
    """What the QC image says of one vertebra."""

    instance_id: int
    name: str
    """Its level ('L3') or component name."""
    centroid: tuple[float, float, float]
    """Centre of mass on the working grid, array index (k, j, i)."""
    note: str = ""
    """'' when refined without a problem; else what happened ('kept input', 'flagged', 'passed through')."""


def _banded(array: np.ndarray, vertebrae: Sequence[QcVertebra], axis: int) -> np.ndarray:
    """A [k, x] plane whose rows near each vertebra come from the plane through its centre along ``axis``.

    ``axis`` 2 gives a sagittal view (planes i = const), 1 a coronal view (planes j = const).
    """
    order = sorted(vertebrae, key=lambda v: v.centroid[0])
    ks = [v.centroid[0] for v in order]
    limits = [0] + [int(round((a + b) / 2)) for a, b in zip(ks[:-1], ks[1:], strict=False)] + [array.shape[0]]
    planes = []
    for v, lo, hi in zip(order, limits[:-1], limits[1:], strict=True):
        index = int(np.clip(round(v.centroid[axis]), 0, array.shape[axis] - 1))
        plane = array[:, :, index] if axis == 2 else array[:, index, :]
        planes.append(plane[lo:hi])
    return np.concatenate(planes, axis=0) if planes else array[:, :, array.shape[2] // 2]


QC_MARGIN = 10
"""Voxels (mm) shown around the structures: views are zoomed onto them, not the whole image."""


def _box(mask: np.ndarray, default: tuple[slice, ...] | None = None) -> tuple[slice, ...]:
    """The bounding box of ``mask`` plus :data:`QC_MARGIN`, clipped to the array (``default``, or the whole
    array, when the mask is empty). A 2D mask gives (slice(None), rows, columns)."""
    found = np.argwhere(mask)
    if not len(found):
        whole = tuple(slice(0, n) for n in mask.shape)
        return (slice(None), *(default or whole)[-2:]) if mask.ndim == 2 else (default or whole)
    lo = np.maximum(found.min(axis=0) - QC_MARGIN, 0)
    hi = np.minimum(found.max(axis=0) + QC_MARGIN + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return (slice(None), *box) if mask.ndim == 2 else box


def _outline(axis, before: np.ndarray, after: np.ndarray, ids: Sequence[int]) -> None:
    axis.imshow(after != 0, cmap="gray", vmin=0, vmax=2.5, origin="lower", interpolation="nearest")
    for value in ids:
        for plane, colour in ((before, INPUT_COLOUR), (after, REFINED_COLOUR)):
            mask = plane == value
            if mask.any() and not mask.all():
                axis.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8)
    axis.set_axis_off()


def write_qc_png(
    before: np.ndarray,
    after: np.ndarray,
    path: str | Path,
    title: str = "",
    vertebrae: Sequence[QcVertebra] = (),
    dpi: int = 100,
) -> Path:
    """Write the QC PNG of instance arrays ``before`` and ``after`` [k, j, i] on the same 1 mm working grid.

    The working grid is LPS with identity direction: k runs inferior -> superior (drawn upwards), j
    anterior -> posterior and i right -> left. Sagittal views show anterior on the left, coronal and axial
    views the patient's left on the image's right (radiological), axial views anterior up. Without
    ``vertebrae`` (e.g. no vertebra was refined) one band through the centre of the foreground is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    ids = sorted((set(np.unique(before).tolist()) | set(np.unique(after).tolist())) - {0})
    shown = list(vertebrae)
    if not shown:
        foreground = np.argwhere((before != 0) | (after != 0))
        centre = foreground.mean(axis=0) if len(foreground) else np.array(before.shape) / 2
        shown = [QcVertebra(0, "", tuple(float(c) for c in centre))]
    columns = max(2, len(vertebrae))
    figure = plt.figure(figsize=(2.6 * columns, 9.5), constrained_layout=True)
    grid = figure.add_gridspec(3, columns, height_ratios=[2.2, 2.2, 1])
    ks, js, is_ = _box((before != 0) | (after != 0))
    for row, (axis_index, name) in enumerate(((2, "sagittal (anterior left)"), (1, "coronal (patient left right)"))):
        axis = figure.add_subplot(grid[row, :])
        across = js if axis_index == 2 else is_
        planes = [_banded(a, shown, axis_index)[ks, across] for a in (before, after)]
        _outline(axis, *planes, ids)
        axis.set_title(f"{name}, each vertebra cut through its own centre", fontsize=9)
        for v in vertebrae:  # at the panel's right edge, level with the vertebra's centre
            flagged = bool(v.note)
            label = f"{v.name} ({v.note})" if flagged else v.name
            axis.text(
                0.99, v.centroid[0] - ks.start, label, color=FLAG_COLOUR if flagged else "white", fontsize=8,
                va="center", ha="right", transform=axis.get_yaxis_transform(), clip_on=True,
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0},
            )  # fmt: skip
    for column, v in enumerate(vertebrae):
        axis = figure.add_subplot(grid[2, column])
        k = int(np.clip(round(v.centroid[0]), 0, before.shape[0] - 1))
        _, vj, vi = _box(np.isin(before[k], [v.instance_id]) | np.isin(after[k], [v.instance_id]), (js, is_))
        _outline(axis, before[k, vj, vi][::-1], after[k, vj, vi][::-1], ids)
        axis.set_title(f"{v.name}: axial" + (f" ({v.note})" if v.note else ""), fontsize=8,
                       color=FLAG_COLOUR if v.note else "black")  # fmt: skip
    legend = [
        Line2D([0], [0], color=INPUT_COLOUR, label="input"),
        Line2D([0], [0], color=REFINED_COLOUR, label="refined"),
    ]
    figure.legend(handles=legend, loc="upper right", fontsize=8, framealpha=0.8)
    if title:
        figure.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")
    plt.close(figure)
    return path
