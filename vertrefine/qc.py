"""The QC preview: mid-sagittal, coronal and axial views of a case with input and refined outlines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path

INPUT_COLOUR = "#ff8c00"
REFINED_COLOUR = "#00d0ff"


def _views(array: np.ndarray, centre: tuple[int, int, int]) -> list[tuple[str, np.ndarray]]:
    """(title, 2-D slice drawn with row 0 at the bottom) for the planes through ``centre``.

    The working grid is LPS with identity direction: k runs inferior -> superior (superior up), j anterior
    -> posterior (axial: anterior up, so rows are flipped) and i right -> left (patient left on the image's
    right: radiological).
    """
    k, j, i = centre
    return [
        ("sagittal", array[:, :, i]),
        ("coronal", array[:, j, :]),
        ("axial", array[k, ::-1, :]),
    ]


def write_qc_png(before: np.ndarray, after: np.ndarray, path: str | Path, title: str = "", dpi: int = 110) -> Path:
    """Write the three-view PNG of instance arrays ``before`` and ``after`` on the same 1 mm working grid."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    foreground = np.argwhere((before != 0) | (after != 0))
    if len(foreground):
        centre = tuple(int(c) for c in np.round(foreground.mean(axis=0)))
    else:
        centre = tuple(s // 2 for s in before.shape)
    ids = sorted((set(np.unique(before).tolist()) | set(np.unique(after).tolist())) - {0})
    figure, axes = plt.subplots(1, 3, figsize=(12, 5), constrained_layout=True)
    for axis, (name, plane_before), (_, plane_after) in zip(
        axes, _views(before, centre), _views(after, centre), strict=True
    ):
        axis.imshow(plane_after != 0, cmap="gray", vmin=0, vmax=2.5, origin="lower", interpolation="nearest")
        for value in ids:
            for plane, colour in ((plane_before, INPUT_COLOUR), (plane_after, REFINED_COLOUR)):
                mask = plane == value
                if mask.any() and not mask.all():
                    axis.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8)
        axis.set_title(name)
        axis.set_axis_off()
    legend = [
        Line2D([0], [0], color=INPUT_COLOUR, label="input"),
        Line2D([0], [0], color=REFINED_COLOUR, label="refined"),
    ]
    axes[0].legend(handles=legend, loc="upper left", fontsize=8, framealpha=0.8)
    if title:
        figure.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")
    plt.close(figure)
    return path
