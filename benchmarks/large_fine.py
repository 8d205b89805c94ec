"""Wall time and peak memory of `vertrefine refine` on a large fine whole-spine label map (issue 11, item 5).

    python -m benchmarks.large_fine                      # builds the input once (cached), then 3 runs
    python -m benchmarks.large_fine --runs 1 -- --model vae

The input: the bundled real example `examples/verse010_ct.nii.gz` (VerSe CT segmentation of L1-L5, 1 mm)
resampled label-aware onto a 0.3 mm grid of 512 x 640 x 400 voxels (153.6 x 192 x 120 mm, the example's
PIR orientation, 131 M voxels, uint8), centred on the spine: the size of a fine CT segmentation of the
lumbar spine. Such an input is already finer than 1.5 mm, which refine writes unchanged unless asked
(`--fine-inputs refine`, which the benchmark passes): then it works on 1 mm inside the vertebrae's region and
writes the result back onto the 0.3 mm grid.

Each run is a fresh `vertrefine refine` process (imports, bundle checksums, sessions, reading, refining and
writing included); peak memory is the child's maximum resident set size (getrusage). Prints every run, the
median, the per-stage seconds of the last run's sidecar and the load average. Not a test: figures depend on
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPE_KJI = (400, 640, 512)
SPACING_MM = 0.3


def build_input(path: Path) -> Path:
    """The example's labels on the fine grid (see the module docstring); written once."""
    if path.exists():
        return path
    from vertrefine.io import read_label_map, write_label_map
    from vertrefine.spatial import resample_labels
    from vertrefine.volume import Geometry, Volume

    ct = read_label_map(ROOT / "examples" / "verse010_ct.nii.gz")
    g = ct.geometry
    centre = g.index_to_physical((np.array(g.size_ijk, dtype=float) - 1) / 2)
    size_ijk = np.array(SHAPE_KJI[::-1], dtype=float)
    origin = centre - g.direction_matrix @ ((size_ijk - 1) / 2 * SPACING_MM)
    fine = Geometry(SHAPE_KJI, (SPACING_MM,) * 3, tuple(origin), g.direction)
    write_label_map(Volume(resample_labels(ct, fine).array, fine), path, like=None)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=Path(tempfile.gettempdir()) / "vertrefine_fine_0.3mm.nii.gz")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more refine options, after --")
    args = parser.parse_args()
    executable = shutil.which("vertrefine")
    if executable is None:
        raise SystemExit("vertrefine is not installed in this environment (pip install .)")
    start = time.perf_counter()
    source = build_input(args.input)
    print(f"input: {source} ({' x '.join(map(str, SHAPE_KJI[::-1]))} voxels at {SPACING_MM} mm; "
          f"{time.perf_counter() - start:.1f} s to have it)")  # fmt: skip
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "refined.nii.gz"
        command = [executable, "refine", str(source), "-o", str(output), "--fine-inputs", "refine", *args.extra]
        for run in range(args.runs):
            output.unlink(missing_ok=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
            peaks.append(peak / 1024 if peak > before or run == 0 else peaks[-1])
            print(f"run {run + 1}: {times[-1]:.2f} s, peak {peaks[-1]:.0f} MiB")
        sidecar = json.loads((Path(folder) / "refined.json").read_text())
    print("stages of the last run (s):", json.dumps(sidecar["seconds"]))
    print(f"vertebrae: {len(sidecar['vertebrae'])}, load average: {os.getloadavg()}")
    shown = f"vertrefine refine {source.name} -o refined.nii.gz --fine-inputs refine {' '.join(args.extra)}"
    print(f"command: {shown.rstrip()}")
    print(f"large_fine: median {statistics.median(times):.2f} s, peak {max(peaks):.0f} MiB ({args.runs} runs)")


if __name__ == "__main__":
    main()
