"""ONNX Runtime CPU latency of a bundle: encode + decode of 128^3 patches, and energy + gradient calls.

    python benchmarks/onnx_latency.py                 # exports a random-weight default-config lsd-ebm bundle
    python benchmarks/onnx_latency.py --bundle DIR    # times an existing bundle

Prints file sizes and timings (best and median of the repeats). Not a test: timings depend on the machine
and on its load (the 1-minute load average is printed with them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vertrefine.bundle import load_bundle


def random_bundle(folder: Path, exporter: str) -> Path:
    """A default-config lsd-ebm bundle with random weights (timing does not depend on the weights)."""
    import torch

    from vertrefine.schedule import DiffusionSchedule
    from vertrefine.train.export import export_bundle
    from vertrefine.train.models import ModelConfig, VertebraModel

    torch.manual_seed(0)
    model = VertebraModel(ModelConfig(kind="lsd-ebm"))
    sampler = dict(t_refine=10, langevin_steps=60, step_size=0.01, noise_scale=0.01, init="encoder")
    start = time.perf_counter()
    out = export_bundle(
        model,
        folder / "bundle",
        schedule=DiffusionSchedule(),
        sampler_defaults=sampler,
        recipe={"command": "benchmarks/onnx_latency.py (random weights)"},
        metrics={},
        exporter=exporter,
    )
    print(f"export ({exporter}): {time.perf_counter() - start:.1f} s")
    return out


def balls(batch: int, side: int, rng: np.random.Generator) -> np.ndarray:
    grid = np.indices((side,) * 3, dtype=np.float32)
    out = np.zeros((batch, 1, side, side, side), np.float32)
    for b in range(batch):
        centre = rng.uniform(0.35 * side, 0.65 * side, 3)[:, None, None, None]
        out[b, 0] = ((grid - centre) ** 2).sum(0) < (0.2 * side) ** 2
    return out


def timed(call, repeats: int) -> tuple[float, float]:
    call()  # warm-up: first runs allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: export a random-weight one)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.bundle or random_bundle(Path(tmp), args.exporter)
        bundle = load_bundle(folder)
        for entry in bundle.manifest["files"].values():
            print(f"{entry['path']}: {entry['bytes'] / 1e6:.2f} MB ({entry['exporter']} exporter)")
        flops = bundle.manifest["flops"]
        print(f"FLOPs per patch: encoder {flops['encoder'] / 1e9:.2f} G, decoder {flops['decoder'] / 1e9:.2f} G")

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        cpu = ["CPUExecutionProvider"]
        encoder = ort.InferenceSession(str(bundle.files["encoder"]), options, providers=cpu)
        decoder = ort.InferenceSession(str(bundle.files["decoder"]), options, providers=cpu)
        rng = np.random.default_rng(0)
        print(f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
        for batch in (1, 5):
            x = balls(batch, bundle.patch, rng)
            z = rng.standard_normal((batch, *bundle.latent_shape)).astype(np.float32)
            enc = timed(lambda x=x: encoder.run(None, {"x": x}), args.repeats)
            dec = timed(lambda z=z: decoder.run(None, {"z": z}), args.repeats)
            both = timed(lambda x=x: decoder.run(None, {"z": encoder.run(None, {"x": x})[0]}), args.repeats)
            print(
                f"batch {batch}: encode {enc[0]:.3f} s, decode {dec[0]:.3f} s, encode+decode {both[0]:.3f} s "
                f"(median {both[1]:.3f} s) = {both[0] / batch:.3f} s per vertebra"
            )
        if bundle.has_energy:
            energy = ort.InferenceSession(str(bundle.files["energy"]), options, providers=cpu)
            z = rng.standard_normal((5, *bundle.latent_shape)).astype(np.float32)
            step = 0 if bundle.kind == "lebm" else bundle.diffusion_schedule().timesteps // 2  # lebm: t is always 0
            t = np.full(5, step, np.int64)
            best, median = timed(lambda: energy.run(None, {"z": z, "t": t}), 200)
            print(f"energy + grad, batch 5: {best * 1e3:.3f} ms (median {median * 1e3:.3f} ms) per call")


if __name__ == "__main__":
    main()
