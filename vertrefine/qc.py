"""The QC preview: each vertebra seen through its own centre, input and refined outlines, levels named.

Rows: a sagittal view, a coronal view and one axial view per vertebra. The sagittal (coronal) view is
stitched from bands, one per vertebra between the midpoints to its neighbours, each cut through that
vertebra's own centre of mass, so a curved or tilted spine shows every vertebra at its middle rather than
whatever a single plane through the volume's centre happens to cross. The input's outlines are drawn in
orange, the result's in cyan, over the result's mask, on the one 1 mm working grid both live on, zoomed onto
the structures (axial views onto their own vertebra). Each vertebra's level is written at the right edge of
the view, level with its centre; a vertebra that was kept as input or flagged is named in red with what
happened to it, and the refinement that was not written for a vertebra kept as input is drawn dashed. The
legend names the outlines and the grey fill (the written label map); letters at each view's edges give
the patient directions (A/P, R/L, S/I).
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
REJECTED_COLOUR = "#ff40ff"
FILL_GREY = 0.4
"""Grey level (0 black, 1 white) of the written label map's fill."""


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


def _outline(
    axis, before: np.ndarray, after: np.ndarray, ids: Sequence[int], rejected: np.ndarray | None = None
) -> None:
    """Grey fill of ``after`` (the written label map), input (orange) and refined (cyan) outlines of each id,
    and the not-written refinement of ``rejected`` (magenta, dashed) when given; all 2D, same shape."""
    axis.imshow(after != 0, cmap="gray", vmin=0, vmax=1 / FILL_GREY, origin="lower", interpolation="nearest")
    planes = [(before, INPUT_COLOUR, "solid"), (after, REFINED_COLOUR, "solid")]
    if rejected is not None:
        planes.append((rejected, REJECTED_COLOUR, "dashed"))
    for value in ids:
        for plane, colour, style in planes:
            mask = plane == value
            if mask.any() and not mask.all():
                axis.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8, linestyles=style)
    axis.set_axis_off()


def _directions(axis, left: str, right: str, bottom: str, top: str) -> None:
    """Patient direction letters at the middle of a view's four edges (A/P, R/L, S/I)."""
    style = {"color": "yellow", "fontsize": 8, "fontweight": "bold", "transform": axis.transAxes}
    axis.text(0.01, 0.5, left, ha="left", va="center", **style)
    axis.text(0.99, 0.5, right, ha="right", va="center", **style)
    axis.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
    axis.text(0.5, 0.99, top, ha="center", va="top", **style)


def write_qc_png(
    before: np.ndarray,
    after: np.ndarray,
    path: str | Path,
    title: str = "",
    vertebrae: Sequence[QcVertebra] = (),
    dpi: int = 100,
    rejected: np.ndarray | None = None,
) -> Path:
    """Write the QC PNG of instance arrays ``before`` and ``after`` [k, j, i] on the same 1 mm working grid.

    The working grid is LPS with identity direction: k runs inferior -> superior (drawn upwards), j
    anterior -> posterior and i right -> left. Sagittal views show anterior on the left, coronal and axial
    views the patient's left on the image's right (radiological), axial views anterior up; letters at the
    edges say so. Without ``vertebrae`` (e.g. no vertebra was refined) one band through the centre of the
    foreground is drawn. ``rejected`` (same shape, optional): instance ids of refinements that were not
    written (vertebrae kept as input), drawn dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

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
        dashed = None if rejected is None else _banded(rejected, shown, axis_index)[ks, across]
        _outline(axis, *planes, ids, dashed)
        _directions(axis, *(("A", "P") if axis_index == 2 else ("R", "L")), "I", "S")
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
        dashed = None if rejected is None else rejected[k, vj, vi][::-1]
        _outline(axis, before[k, vj, vi][::-1], after[k, vj, vi][::-1], ids, dashed)
        _directions(axis, "R", "L", "P", "A")
        axis.set_title(f"{v.name}: axial" + (f" ({v.note})" if v.note else ""), fontsize=8,
                       color=FLAG_COLOUR if v.note else "black")  # fmt: skip
    legend = [
        Line2D([0], [0], color=INPUT_COLOUR, label="input"),
        Line2D([0], [0], color=REFINED_COLOUR, label="refined"),
        Patch(facecolor=str(FILL_GREY), edgecolor="black", label="grey fill: written label map"),
    ]
    if rejected is not None and rejected.any():
        legend.append(
            Line2D([0], [0], color=REJECTED_COLOUR, linestyle="--", label="refinement not written (kept as input)")
        )
    figure.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=8, framealpha=0.8)
    if title:
        figure.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")
    plt.close(figure)
    return path
