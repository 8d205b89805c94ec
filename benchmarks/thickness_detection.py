"""Does :mod:`vertrefine.thickness` find the slice thickness of thick-slice label maps stored on fine grids?

Real CT label maps (``../shared/data/real-ct``) are made into staircases: along each array axis, slabs of
2, 3, 4, 5 and 7 mm (a random phase per case), labelled by slab majority or by nearest neighbour (the label
at the slab's centre), on the map's own grid; and 5 mm slabs resampled by nearest neighbour onto isotropic
0.8 and 0.6 mm grids (periods of 6.25 and 8.33 voxels); 5 mm slabs also with islands (10 cubes of 2-3
voxels of a vertebra's label) and two noisy planes (a label grown by one voxel in one plane). Every native map is
checked too: a fine one must give no staircase, and so must a genuinely thick native grid.

    python -m benchmarks.thickness_detection                              # all maps in ../shared/data/real-ct
    python -m benchmarks.thickness_detection --markdown docs/results/thickness_detection.md

A row passes when the thickness found is within 2 % of the slabs' on their axis and no other axis is a
staircase (except, on the 0.6 / 0.8 mm grids, the native grid's own voxels where they are 1.8 fine voxels or
more: a staircase too), and for a native map when no axis is a staircase of 1.6 mm or more (``THICK_MM``,
what refine acts on; automatic labels made at 1.5 mm and written on a finer CT grid are staircases of that
size).
A slab thinner than 1.8 voxels (2 mm on the 1.25 mm grid) is expected to give none (``MIN_PERIOD``). The
table and the summary go to stdout (and ``--markdown``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from vertrefine.io import read_label_map
from vertrefine.spatial import output_geometry, resample_labels
from vertrefine.thickness import MIN_PERIOD, THICK_MM, detect_slices
from vertrefine.volume import Geometry, Volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct"
STAIR_FILES = ("verse__sub-verse010", "sawbones__lumbarspinecreator", "verse__sub-gl003")
"""Fine maps made into staircases: 1 mm (VerSe, a synthetic-bone CT), 0.29 x 0.29 x 1.25 mm (VerSe)."""
THICKNESSES_MM = (2.0, 3.0, 4.0, 5.0, 7.0)
FINE_GRIDS_MM = (0.8, 0.6)
AXES = ("k", "j", "i")


def slabs(volume: Volume, axis: int, thickness: float, phase: float, how: str) -> Volume:
    """Slabs of ``thickness`` mm along array ``axis`` (slab of voxel n: floor((n s + phase) / thickness)),
    each column of a slab holding its majority label ('majority') or its centre voxel's ('nearest'); the
    map's own grid."""
    array = volume.array
    spacing = volume.geometry.spacing[2 - axis]
    n = array.shape[axis]
    absolute = np.floor((np.arange(n) * spacing + phase) / thickness).astype(int)
    slab = absolute - absolute[0]
    starts = np.flatnonzero(np.diff(slab, prepend=-1))
    if how == "nearest":  # the voxel nearest the slab's centre, (slab + 0.5) * thickness - phase mm from voxel 0
        centre = np.clip(np.rint(((absolute + 0.5) * thickness - phase) / spacing), 0, n - 1).astype(int)
        return Volume(np.take(array, centre, axis=axis), volume.geometry)
    labels = np.unique(array)
    counts = np.stack([np.add.reduceat((array == v).astype(np.uint16), starts, axis=axis) for v in labels])
    winner = labels[np.argmax(counts, axis=0)].astype(array.dtype)
    return Volume(np.take(winner, slab, axis=axis), volume.geometry)


def coarse(volume: Volume, axis: int, thickness: float) -> Volume:
    """The native thick-slice map: one voxel per slab of ``thickness`` mm along ``axis`` (slab majority)."""
    array = volume.array
    spacing = volume.geometry.spacing[2 - axis]
    per = thickness / spacing
    n_slabs = int(array.shape[axis] // per)
    slab = np.minimum((np.arange(array.shape[axis]) / per).astype(int), n_slabs - 1)
    starts = np.flatnonzero(np.diff(slab, prepend=-1))
    labels = np.unique(array)
    counts = np.stack([np.add.reduceat((array == v).astype(np.uint16), starts, axis=axis) for v in labels])
    winner = labels[np.argmax(counts, axis=0)].astype(array.dtype)
    new_spacing = list(volume.geometry.spacing)
    new_spacing[2 - axis] = thickness
    first = [0.0, 0.0, 0.0]  # (i, j, k): the first slab's centre in the fine grid's continuous index
    first[2 - axis] = per / 2 - 0.5
    origin = volume.geometry.index_to_physical(np.asarray(first))
    geometry = Geometry(winner.shape, tuple(new_spacing), tuple(origin), volume.geometry.direction)
    return Volume(winner, geometry)


def noisy(volume: Volume, rng: np.random.Generator) -> Volume:
    """Islands (10 cubes of 2 or 3 voxels of a vertebra label within 15 voxels of the labels) and two noisy
    planes (a label grown by one voxel within one plane of axis 0)."""
    array = volume.array.copy()
    present = [v for v in np.unique(array) if v]
    inside = np.argwhere(array != 0)
    for _ in range(10):
        centre = inside[rng.integers(len(inside))] + rng.integers(-15, 16, 3)
        size = int(rng.integers(2, 4))
        lo = np.clip(centre, 0, np.array(array.shape) - size)
        array[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = rng.choice(present)
    for k in rng.choice(np.flatnonzero(np.any(array, axis=(1, 2))), 2, replace=False):
        plane = array[k]
        label = rng.choice(present)
        grown = np.zeros_like(plane, dtype=bool)
        mask = plane == label
        grown[1:] |= mask[:-1]
        grown[:, 1:] |= mask[:, :-1]
        array[k] = np.where(grown & (plane == 0), label, plane)
    return Volume(array, volume.geometry)


def found_text(volume: Volume) -> tuple[str, list[float | None], float]:
    """(text of the detection, thickness per array axis or None, seconds)."""
    start = time.perf_counter()
    detection = detect_slices(volume)
    seconds = time.perf_counter() - start
    values = [None if s is None else s.thickness_mm for s in detection.staircases]
    text = ", ".join(f"{AXES[a]} {v:.2f} mm" for a, v in enumerate(values) if v is not None) or "none"
    return text, values, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, str, str, str, bool]] = []  # case, made, expected, found, ok

    def check(name: str, made: str, volume: Volume, expected: dict[int, float] | None) -> None:
        """``expected``: thickness (mm) per array axis that is a staircase, the others must give none; None
        (a native map): no staircase of THICK_MM or more (what refine acts on)."""
        text, values, _ = found_text(volume)
        if expected is None:
            ok = all(v is None or v < THICK_MM for v in values)
            want = f"none >= {THICK_MM:g} mm"
        else:
            ok = all(
                (values[a] is None)
                if a not in expected
                else (values[a] is not None and abs(values[a] - expected[a]) <= 0.02 * expected[a])
                for a in range(3)
            )
            want = ", ".join(f"{AXES[a]} {t:.3g} mm" for a, t in sorted(expected.items())) or "none"
        rows.append((name, made, want, text, ok))
        print(f"{name:34s} {made:44s} want {want:10s} found {text:22s} {'ok' if ok else 'MISS'}", flush=True)

    files = sorted(args.data.glob("*.nii.gz"))
    volumes = {f.name.removesuffix(".nii.gz"): read_label_map(f) for f in files}
    for name, volume in volumes.items():
        spacing = "x".join(f"{s:.3g}" for s in volume.geometry.spacing)
        check(name, f"native ({spacing} mm)", volume, None)
    for name in STAIR_FILES:
        volume = volumes.get(name)
        if volume is None:
            continue
        for axis in range(3):
            spacing = volume.geometry.spacing[2 - axis]
            for thickness in THICKNESSES_MM:
                for how in ("majority", "nearest"):
                    phase = float(rng.uniform(0, thickness))
                    made = slabs(volume, axis, thickness, phase, how)
                    want = {axis: thickness} if thickness / spacing >= MIN_PERIOD else {}
                    check(name, f"{thickness:g} mm {how} along {AXES[axis]} ({spacing:.3g} mm grid)", made, want)
            made = noisy(slabs(volume, axis, 5.0, float(rng.uniform(0, 5)), "majority"), rng)
            check(name, f"5 mm majority along {AXES[axis]} + islands, noisy planes", made, {axis: 5.0})
            thick = coarse(volume, axis, 5.0)
            for grid in FINE_GRIDS_MM:
                fine = resample_labels(thick, output_geometry(thick.geometry, grid), method="nearest")
                # the other axes: the native grid's own voxels, a staircase too when MIN_PERIOD fine voxels or more
                native = [thick.geometry.spacing[2 - a] for a in range(3)]
                want = {a: s for a, s in enumerate(native) if s / grid >= MIN_PERIOD}
                check(name, f"5 mm along {AXES[axis]}, nearest onto {grid:g} mm", fine, want)
    passed = sum(ok for *_, ok in rows)
    summary = f"{passed} of {len(rows)} rows as expected"
    print(summary)
    if args.markdown is not None:
        lines = ["| case | made | expected | found | ok |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {m} | {w} | {f} | {'yes' if ok else 'NO'} |" for n, m, w, f, ok in rows]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + f"\n\n{summary}\n", encoding="utf-8")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
