"""Whole-process wall time of `vertrefine refine` on a 5-vertebra 1 mm spine, as a user runs it.

    python -m benchmarks.refine_time                         # the bundled example, default settings, 5 runs
    python -m benchmarks.refine_time --input X.nii.gz --runs 3 -- --model vae

Each run is a fresh `vertrefine refine` process (interpreter start, imports, bundle checksums, ONNX
Runtime sessions, reading, refining and writing included). Prints every run, then the median and best,
the per-stage seconds of the last run's sidecar, and the machine's load average (timings on a loaded
machine are not comparable). Not a test: the figure depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=ROOT / "examples" / "lumbar_thick5mm.nii.gz")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("extra", nargs="*", help="more refine options, after --")
    args = parser.parse_args()
    executable = shutil.which("vertrefine")
    if executable is None:
        raise SystemExit("vertrefine is not installed in this environment (pip install .)")
    times = []
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "refined.nii.gz"
        command = [executable, "refine", str(args.input), "-o", str(output), *args.extra]
        for run in range(args.runs):
            output.unlink(missing_ok=True)
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
            print(f"run {run + 1}: {times[-1]:.2f} s")
        sidecar = json.loads((Path(folder) / "refined.json").read_text())
    print("stages of the last run (s):", json.dumps(sidecar["seconds"]))
    print(f"vertebrae: {len(sidecar['vertebrae'])}, device: {sidecar['device']}, load average: {os.getloadavg()}")
    print(f"command: vertrefine refine {args.input.name} -o refined.nii.gz {' '.join(args.extra)}".rstrip())
    print(f"refine_time: median {statistics.median(times):.2f} s  best {min(times):.2f} s  ({args.runs} runs)")


if __name__ == "__main__":
    main()
