"""Speed of `vertrefine refine` against a torch re-implementation of the paper's inference, same weights.

    python -m benchmarks.speed --quick                     # ~1 min at 1 thread, a few at 2 (2-core CPU)
    python -m benchmarks.speed --quick --json speed.json   # the same, and every figure measured as JSON
    python -m benchmarks.speed                             # full: more cases and repeats, training steps
    python -m benchmarks.speed --threads 2                 # both sides on 2 threads, whatever the load

Run from the repository root (the reference subprocess is `python -m benchmarks.speed --reference-case`).
Not a test: the figures depend on the machine and on what else runs on it.

Both sides use the shipped lsd-ebm bundle (weights/lsd-ebm, or --bundle): vertrefine through ONNX Runtime,
the reference through the torch VertebraModel rebuilt from the same ONNX weights
(vertrefine.train.from_bundle.model_from_bundle).

REFERENCE: the paper's Algorithm 2 as its original code runs it (DESIGN.md section 3), one vertebra at a
time (batch 1), in torch. With the bundle's schedule (a_s, sigmas, a_s_cum, sigmas_cum; T = 20), t_r = 6,
K = 300, lambda = 0.01:

    mu, _   = encoder(x)                                        x: the vertebra's 128^3 binary patch
    z_{t_r} = a_s_cum[t_r] * mu + q * sigmas_cum[t_r] * eps     q: the schedule's noise_scale (see below)
    for t = t_r - 1, ..., 0:                                    (t = 5 .. 0)
        y_0     ~ N(0, I)                                       fresh noise, not z_{t+1}, as the code does
        U(y)    = E(y, t) + ||z_{t+1} - y||^2 / (2 sigma_{t+1}^2)
        y_{k+1} = y_k - (lambda / 2) * dU/dy(y_k) + sqrt(lambda) * 0.01 * eps_k,   k = 0 .. K-1
                  (dU/dy by torch.autograd.grad, as the code)
        z_t     = y_K / a_s[t+1]
    mask    = decoder(z_0) > 0.5                                decoder: sigmoid probabilities

q is the bundle's schedule noise_scale: the original code's q is 0.1, but these weights were trained (and
refine diffuses) with 1, which the manifest records; it changes no timing. Encoder and decoder run under
torch.no_grad. Around it, the same pre- and post-processing as refine
(1 mm working grid, vertebra instances, 128^3 crops, stitching, back to the input grid), so the two sides
differ only in how the model runs.

VERTREFINE: `vertrefine refine` defaults: ONNX Runtime (CPU here; threads: below), the numpy sampler with the
bundle's sampler_defaults (its t_refine, Langevin steps, step size, noise, data-consistency guidance; chains started at
z_{t+1}, the energy's exported explicit gradient), all vertebrae of a case encoded, sampled and decoded
together (ONNX batches of up to 4 patches).

Threads: both sides get the same number of CPU threads, --threads (torch.set_num_threads for the
reference, ONNX Runtime's intra-op threads for vertrefine, `--threads` for the CLI unless it is every
core, the BLAS threads for the sgemm peak). The default, auto, takes the cores that other processes leave
free (cores - the 1-minute load average, rounded, at least 1): on a shared machine, torch with more threads
than free cores waits on descheduled threads in every parallel region, which made the reference's batch-1
Langevin step 30x slower (31 ms against 0.9 ms at one thread, 2 cores with one busy) and would credit
vertrefine with the machine's load. With every core free, auto is each runtime's default (all cores).

Cases: held-out synthetic spines (vertrefine.synth.synth_spine, seeds from 100000; training used 1000-1499)
with five lumbar vertebrae, degraded with degrade(truth, slice_mm=5, axis="sagittal", seed=seed, native=True): the
thick-slice segmentation on its own 1 x 1 x 5 mm grid, as a clinic's comes, so refine's defaults include the
data-consistency guidance and the 1 mm output grid. A
single-vertebra case keeps one label of a spine (L1..L5 by seed).

Measured:
- in-process steady state: wall time per single-vertebra case and per spine (5 vertebrae; 3 of each with
  --quick, 5 without), after a warm-up run of each side (the reference's warm-up runs 5 Langevin steps:
  it only has to touch every kernel), with stages encode / sample / decode / other (other: resampling,
  cropping, stitching, back to the input grid);
- whole process, one spine, fresh subprocess: the reference as `python -m benchmarks.speed --reference-case
  IN OUT` (imports, loading the weights without the parity check, reading and writing included),
  vertrefine as the `vertrefine refine IN -o OUT` console script (1 run of each with --quick; 2 and 3
  without). Each runs under its own wrapper process that reads
  resource.getrusage(RUSAGE_CHILDREN).ru_maxrss: the peak RSS of that side alone (MiB);
- FLOP efficiency of encoder and decoder: FLOPs per patch from the manifest ("flops") x batch / median
  time (3 repeats with --quick, 7 without), against a measured sgemm peak (numpy float32 2048 x 2048
  matmul, median of 5, same threads): torch at batch 1 (the reference), ONNX Runtime at batch 1 and 4
  (refine's chunk);
- training cost: seconds_per_epoch and hardware from each shipped bundle's recipe (measured by training);
  without --quick also --training-steps (3) optimisation steps per kind (vae, lebm, lsd-ebm), after one
  warm-up step, at batch 8 on random 64^3 soft patches with vertrefine.train.objectives.make_objective and
  Adam, extrapolated to an epoch of 2250 patches (labelled as extrapolated);
- GPU: with torch.cuda available, the reference on CUDA; with ONNX Runtime's CUDA provider usable,
  vertrefine on CUDA; otherwise a line saying no GPU was available.

The machine may be shared: the load average is printed before and after. The last line is

    speedup X.Xx per spine (reference A s, vertrefine B s)

with A and B the medians of the in-process steady-state per-spine wall times (5 vertebrae, after warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.onnx_latency import balls
from vertrefine.bundle import default_bundle_dir, read_manifest
from vertrefine.degrade import degrade
from vertrefine.io import read_label_map, write_label_map
from vertrefine.refine import Refiner, refined_instances
from vertrefine.runtime import cuda_usable
from vertrefine.sampler import SamplerSettings
from vertrefine.schedule import DiffusionSchedule
from vertrefine.spatial import (
    crop_instances,
    find_instances,
    resample_labels,
    restore_labels,
    stitch,
    to_input_grid,
    working_geometry,
)
from vertrefine.synth import synth_spine
from vertrefine.train.from_bundle import model_from_bundle
from vertrefine.train.loop import cpu_name
from vertrefine.volume import Geometry, Volume

ROOT = Path(__file__).resolve().parent.parent
FIRST_SEED = 100_000
SLICE_MM = 5.0
AXIS = "sagittal"
LUMBAR = (20, 21, 22, 23, 24)
STAGES = ("encode", "sample", "decode", "other")


# --------------------------------------------------------------------------------------------------
# The reference: the paper's inference as its code runs it (torch, batch 1, autograd Langevin)
# --------------------------------------------------------------------------------------------------


REFERENCE = SamplerSettings(t_refine=6, langevin_steps=300, step_size=0.01, noise_scale=0.01, init="noise")
"""The original code's refinement settings (DESIGN.md section 3): each reverse step's chain starts at fresh
N(0, I) noise (init 'noise'), and the Langevin noise std is sqrt(0.01) * 0.01; no guidance."""
REFERENCE_THRESHOLD = 0.5
"""The original code's probability threshold."""


def reference_potential_grad(
    energy: torch.nn.Module, y: torch.Tensor, z_next: torch.Tensor, t: torch.Tensor, sigma: float
) -> torch.Tensor:
    """dU/dy of U(y) = E(y, t) + ||z_{t+1} - y||^2 / (2 sigma^2) per row, by torch.autograd.grad."""
    y = y.detach().requires_grad_(True)
    potential = energy(y, t).sum() + ((z_next - y) ** 2).sum() / (2.0 * sigma**2)
    (grad,) = torch.autograd.grad(potential, y)
    return grad


def reference_reverse_step(
    energy: torch.nn.Module,
    z_next: torch.Tensor,
    t: int,
    schedule: DiffusionSchedule,
    settings: SamplerSettings,
    generator: torch.Generator,
) -> torch.Tensor:
    """z_t from z_{t+1}: K Langevin steps on U from fresh N(0, I) noise, then divided by a_s[t+1]."""
    sigma = float(schedule.sigmas[t + 1])
    steps = torch.full((z_next.shape[0],), t, dtype=torch.long, device=z_next.device)
    y = torch.randn(z_next.shape, generator=generator, device=z_next.device)
    noise_std = math.sqrt(settings.step_size) * settings.noise_scale
    for _ in range(settings.langevin_steps):
        grad = reference_potential_grad(energy, y, z_next, steps, sigma)
        y = y - 0.5 * settings.step_size * grad
        y = y + noise_std * torch.randn(y.shape, generator=generator, device=y.device)
    return y / float(schedule.a_s[t + 1])


def reference_sample(
    energy: torch.nn.Module,
    mu: torch.Tensor,
    schedule: DiffusionSchedule,
    settings: SamplerSettings,
    generator: torch.Generator,
) -> torch.Tensor:
    """Diffuse the encoder's mean to t_refine with the schedule's q, then the reverse chain t_refine - 1 .. 0."""
    t_refine = settings.t_refine
    noise = torch.randn(mu.shape, generator=generator, device=mu.device)
    z = float(schedule.a_s_cum[t_refine]) * mu + schedule.noise_scale * float(schedule.sigmas_cum[t_refine]) * noise
    for t in range(t_refine - 1, -1, -1):
        z = reference_reverse_step(energy, z, t, schedule, settings, generator)
    return z


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stages(total: float, encode: float, sample: float, decode: float) -> dict[str, float]:
    return {
        "total": total,
        "encode": encode,
        "sample": sample,
        "decode": decode,
        "other": total - encode - sample - decode,
    }


def back_to_input(volume: Volume, working: Geometry, instances: list, after: np.ndarray) -> Volume:
    """The refined instance array as labels on the input grid; labels that were not refined pass through."""
    labels = restore_labels(after, instances)
    if not working.same_grid(volume.geometry, tol=1e-6):
        labels = to_input_grid(Volume(labels, working), volume.geometry).array
    refined = np.array(sorted({i.label for i in instances}))
    passthrough = (volume.array != 0) & ~np.isin(volume.array, refined)
    out = np.where(np.isin(labels, refined), labels, 0).astype(volume.array.dtype)
    out[passthrough] = volume.array[passthrough]
    return volume.with_array(out)


class ReferenceSide:
    """The reference pipeline on a bundle's weights, rebuilt in torch; one vertebra after the other."""

    name = "reference"

    def __init__(
        self,
        bundle_dir: Path,
        settings: SamplerSettings | None = None,
        device: str = "cpu",
        verify: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model_from_bundle(bundle_dir, verify=verify).to(self.device)
        manifest = read_manifest(bundle_dir)
        self.schedule = DiffusionSchedule(**manifest["schedule"])
        self.spacing = float(manifest["spacing_mm"])
        self.patch = int(manifest["patch_size"])
        self.settings = settings or REFERENCE
        if self.model.energy is None:
            raise ValueError(f"{bundle_dir}: the reference needs an lsd-ebm bundle (it has no energy)")

    def refine_patch(
        self, patch: np.ndarray, generator: torch.Generator, settings: SamplerSettings | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """One vertebra's 128^3 patch -> its refined binary mask, and seconds of encode / sample / decode."""
        settings = settings or self.settings
        x = torch.from_numpy(patch)[None, None].to(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            mu, _ = self.model.encoder(x)
        _sync(self.device)
        encoded = time.perf_counter()
        z = reference_sample(self.model.energy, mu, self.schedule, settings, generator)
        _sync(self.device)
        sampled = time.perf_counter()
        with torch.no_grad():
            mask = (self.model.decoder(z)[0, 0] > REFERENCE_THRESHOLD).cpu().numpy()
        decoded = time.perf_counter()
        return mask, {"encode": encoded - start, "sample": sampled - encoded, "decode": decoded - sampled}

    def refine(
        self, volume: Volume, seed: int, settings: SamplerSettings | None = None
    ) -> tuple[Volume, dict[str, float]]:
        """Refine every vertebra of ``volume``, one after the other; (labels, seconds per stage and total)."""
        start = time.perf_counter()
        working_grid = working_geometry(volume.geometry, self.spacing)
        instance_array, instances = find_instances(resample_labels(volume, working_grid))
        chosen = refined_instances(instances, None)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        patches, seconds = [], {"encode": 0.0, "sample": 0.0, "decode": 0.0}
        for instance, box, patch in crop_instances(instance_array, chosen, self.patch):
            mask, spent = self.refine_patch(patch, generator, settings)
            patches.append((instance.instance_id, box, mask.astype(np.float32)))
            for key, value in spent.items():
                seconds[key] += value
        after = stitch(instance_array, patches, threshold=0.5)
        labels = back_to_input(volume, working_grid, chosen, after)
        return labels, _stages(time.perf_counter() - start, **seconds)


class VertrefineSide:
    """`vertrefine refine` with its defaults, in-process (ONNX Runtime sessions kept open)."""

    name = "vertrefine"

    def __init__(self, bundle_dir: Path, device: str = "auto", threads: int = 0) -> None:
        self.refiner = Refiner.from_bundle(bundle_dir, device=device, threads=threads, fine_inputs="refine")
        self.sessions = self.refiner.sessions

    def refine(self, volume: Volume, seed: int) -> tuple[Volume, dict[str, float]]:
        """Refine ``volume`` as the CLI does; (labels, seconds per stage and total)."""
        start = time.perf_counter()
        refined = self.refiner(volume, seed=seed)
        total = time.perf_counter() - start
        s = refined.seconds
        return refined.labels, _stages(total, s["encode"], s.get("sample", 0.0), s["decode"])


# --------------------------------------------------------------------------------------------------
# Cases and timing
# --------------------------------------------------------------------------------------------------


def make_spine(seed: int) -> Volume:
    """A held-out synthetic lumbar spine (L1..L5), degraded to 5 mm sagittal slices."""
    return degrade(synth_spine(seed), slice_mm=SLICE_MM, axis=AXIS, seed=seed, native=True)


def single_vertebra(spine: Volume, seed: int) -> Volume:
    """The spine with one label kept (L1..L5 by seed)."""
    label = LUMBAR[seed % len(LUMBAR)]
    return spine.with_array(np.where(spine.array == label, spine.array, 0).astype(spine.array.dtype))


def warm_up(reference: Any, vertrefine: Any, spine: tuple[int, Volume], vertebra: tuple[int, Volume]) -> None:
    """One run of each side before timing (kernels chosen, memory allocated); the reference's with 5
    Langevin steps instead of 300, which touches every kernel as well."""
    for side in (reference, vertrefine):
        if isinstance(side, ReferenceSide):
            side.refine(vertebra[1], vertebra[0], replace(REFERENCE, langevin_steps=5))
        elif side is not None:
            side.refine(spine[1], spine[0])
            side.refine(vertebra[1], vertebra[0])


def time_cases(side: Any, cases: list[tuple[int, Volume]], label: str) -> list[dict[str, float]]:
    runs = []
    for seed, volume in cases:
        _, seconds = side.refine(volume, seed)
        runs.append(seconds)
        print(f"  {side.name:10s} {label:8s} seed {seed}: {seconds['total']:.2f} s", flush=True)
    return runs


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "n": len(runs),
        "median": {key: statistics.median(r[key] for r in runs) for key in ("total", *STAGES)},
        "runs": runs,
    }


_SGEMM = r"""
import json, statistics, sys, time
import numpy as np
size, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((size, size), dtype=np.float32)
b = rng.standard_normal((size, size), dtype=np.float32)
a @ b
times = []
for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def sgemm_peak(threads: int, repeats: int = 5, size: int = 2048) -> dict[str, Any]:
    """GFLOP/s of a numpy float32 size x size matmul (median of ``repeats`` after one warm-up), with the BLAS
    limited to ``threads`` threads (a fresh process: the thread count is fixed when numpy loads its BLAS)."""
    env = dict(os.environ)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    done = subprocess.run(
        [sys.executable, "-c", _SGEMM, str(size), str(repeats)], capture_output=True, text=True, check=True, env=env
    )
    times = json.loads(done.stdout.strip().splitlines()[-1])
    median = statistics.median(times)
    return {
        "size": size,
        "repeats": repeats,
        "threads": threads,
        "times_s": times,
        "median_s": median,
        "gflops": 2 * size**3 / median / 1e9,
    }


def _median_time(call: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flop_efficiency(
    reference: ReferenceSide, vertrefine: VertrefineSide, flops: dict[str, int], peak: float, repeats: int
) -> list[dict[str, Any]]:
    """Encoder and decoder GFLOP/s: torch at batch 1, ONNX Runtime at batch 1 and 4."""
    rows = []
    model, device = reference.model, reference.device
    sessions = vertrefine.sessions.sessions
    latent = model.config.latent_shape
    runtime_name = f"onnxruntime ({vertrefine.sessions.providers[0].replace('ExecutionProvider', '')})"
    for runtime, batch in (("torch", 1), (runtime_name, 1), (runtime_name, 4)):
        x = balls(batch, model.config.patch, np.random.default_rng(0))
        z = np.random.default_rng(batch).standard_normal((batch, *latent)).astype(np.float32)
        if runtime == "torch":
            xt, zt = torch.from_numpy(x).to(device), torch.from_numpy(z).to(device)

            def encode(xt=xt):
                with torch.no_grad():
                    return model.encoder(xt)

            def decode(zt=zt):
                with torch.no_grad():
                    return model.decoder(zt)

            calls = {"encoder": encode, "decoder": decode}
            sync = lambda: _sync(device)  # noqa: E731
        else:
            calls = {
                "encoder": lambda x=x: sessions["encoder"].run(None, {"x": x}),
                "decoder": lambda z=z: sessions["decoder"].run(None, {"z": z}),
            }
            sync = lambda: None  # noqa: E731
        for name, call in calls.items():
            median = _median_time(call, repeats, sync)
            gflops = flops[name] * batch / median / 1e9
            rows.append(
                {
                    "runtime": runtime,
                    "model": name,
                    "batch": batch,
                    "median_s": median,
                    "repeats": repeats,
                    "gflops": gflops,
                    "percent_of_peak": 100.0 * gflops / peak,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------------
# Whole process and peak memory
# --------------------------------------------------------------------------------------------------

_WRAPPER = r"""
import json, resource, subprocess, sys, time
command = json.loads(sys.argv[1])
start = time.perf_counter()
done = subprocess.run(command, capture_output=True, text=True, cwd=sys.argv[2])
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall_s": wall, "ru_maxrss": peak, "returncode": done.returncode,
                  "stdout": done.stdout[-4000:], "stderr": done.stderr[-4000:]}))
"""


def measured_process(command: list[str]) -> dict[str, Any]:
    """Run ``command`` as the only child of a fresh wrapper process: its wall time and peak RSS (MiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, json.dumps(command), str(ROOT)], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    divisor = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    result["peak_rss_mib"] = result.pop("ru_maxrss") / divisor
    result["command"] = command
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result['returncode']}): {result['stderr'][-2000:]}")
    return result


def vertrefine_command() -> list[str]:
    """The `vertrefine` console script of this interpreter (else on PATH, else the Typer app via -c)."""
    beside = Path(sys.executable).parent / "vertrefine"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("vertrefine")
    if found:
        return [found]
    return [sys.executable, "-c", "from vertrefine.cli import app; app()"]


def whole_process(
    bundle_dir: Path, spine_file: Path, folder: Path, threads: int, reference_runs: int, vertrefine_runs: int
) -> dict[str, Any]:
    """Each side on one spine file, as fresh processes: wall time, peak RSS, and its own stage seconds."""
    out: dict[str, Any] = {}
    command = [
        sys.executable,
        "-m",
        "benchmarks.speed",
        "--reference-case",
        str(spine_file),
        str(folder / "reference.nii.gz"),
        "--bundle",
        str(bundle_dir),
        "--threads",
        str(threads),
    ]
    runs = []
    for _ in range(reference_runs):
        result = measured_process(command)
        result["stages"] = json.loads(result.pop("stdout").strip().splitlines()[-1])
        runs.append(result)
        print(f"  reference  {result['wall_s']:.2f} s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    out["reference"] = {"runs": runs}
    runs = []
    output = folder / "vertrefine.nii.gz"
    for _ in range(vertrefine_runs):
        output.unlink(missing_ok=True)
        command = [*vertrefine_command(), "refine", str(spine_file), "-o", str(output), "--weights", str(bundle_dir)]
        if threads != os.cpu_count():
            command += ["--threads", str(threads)]
        result = measured_process(command)
        result.pop("stdout")
        result["stages"] = json.loads((folder / "vertrefine.json").read_text())["seconds"]
        runs.append(result)
        print(f"  vertrefine {result['wall_s']:.2f} s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    out["vertrefine"] = {"runs": runs}
    for side in out.values():
        side["median_wall_s"] = statistics.median(r["wall_s"] for r in side["runs"])
        side["peak_rss_mib"] = max(r["peak_rss_mib"] for r in side["runs"])
    return out


def run_reference_case(source: Path, destination: Path, bundle_dir: Path, threads: int) -> None:
    """The reference subprocess: read one case, refine it with the reference, write it; stages as JSON."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    side = ReferenceSide(bundle_dir, verify=False)  # loading the weights, as torch.load would, without a check
    volume = read_label_map(source)
    loaded = time.perf_counter()
    labels, seconds = side.refine(volume, seed=0)
    write_label_map(labels, destination)
    seconds["load"] = loaded - start
    seconds["process_total"] = time.perf_counter() - start
    print(json.dumps(seconds))


# --------------------------------------------------------------------------------------------------
# Training cost and GPU
# --------------------------------------------------------------------------------------------------


def recipe_costs(bundle_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, folder in bundle_dirs.items():
        recipe = read_manifest(folder).get("recipe", {})
        out[name] = {
            key: recipe.get(key) for key in ("model", "epochs", "batch_size", "seconds", "seconds_per_epoch")
        } | {"hardware": recipe.get("hardware"), "train_patches": recipe.get("data", {}).get("train_patches")}
        out[name]["exported_as"] = recipe.get("exported_as")
    return out


def training_step_times(bundle_dir: Path, steps: int, batch: int = 8, epoch_patches: int = 2250) -> dict[str, Any]:
    """Seconds per optimisation step of each model kind (after one warm-up step), extrapolated to an epoch."""
    from vertrefine.train.config import TrainConfig
    from vertrefine.train.models import ModelConfig, VertebraModel
    from vertrefine.train.objectives import LangevinConfig, make_objective

    manifest = read_manifest(bundle_dir)
    config = manifest["recipe"].get("config", {})
    schedule = DiffusionSchedule(**manifest["schedule"])
    recipe = TrainConfig.from_dict(dict(config))  # the run's own training options
    langevin = LangevinConfig(
        recipe.chain,
        posterior_steps=recipe.posterior_steps,
        posterior_step_size=recipe.posterior_step_size,
    )
    steps_per_epoch = math.ceil(epoch_patches / batch)
    out: dict[str, Any] = {"batch": batch, "epoch_patches": epoch_patches, "steps_per_epoch": steps_per_epoch}
    for kind in ("vae", "lebm", "lsd-ebm"):
        torch.manual_seed(0)
        model = VertebraModel(ModelConfig.from_dict({**manifest["model_config"], "kind": kind})).train()
        objective = make_objective(
            model,
            schedule,
            langevin,
            kl_weight=config.get("kl_weight", 1.0),
            energy_on_clean=config.get("energy_on_clean", True),
        )
        groups = model.parameter_groups()
        param_groups = [{"params": groups["autoencoder"], "lr": config.get("lr", 5e-4)}]
        if "energy" in groups:
            param_groups.append({"params": groups["energy"], "lr": config.get("energy_lr", 1e-4)})
        optimizer = torch.optim.Adam(param_groups)
        generator = torch.Generator().manual_seed(0)
        side = model.config.lowres
        x = torch.rand(batch, 1, side, side, side, generator=generator)  # soft occupancies in [0, 1]
        target = torch.rand(batch, 1, side, side, side, generator=generator)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            loss, _ = objective(x, target, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        out[kind] = {"step_s": times[1:], "warmup_s": times[0], "median_step_s": median}
        out[kind]["epoch_s_extrapolated"] = median * steps_per_epoch
        print(f"  {kind:8s} {median:.2f} s/step (median of {steps})", flush=True)
    return out


def gpu_timings(bundle_dir: Path, spine: tuple[int, Volume], vertebra: tuple[int, Volume]) -> dict[str, Any]:
    """Reference on torch CUDA and vertrefine on ONNX Runtime's CUDA provider, where each is usable."""
    out: dict[str, Any] = {"torch_cuda": torch.cuda.is_available(), "onnxruntime_cuda": cuda_usable()}
    if out["torch_cuda"]:
        out["device_name"] = torch.cuda.get_device_name(0)
    sides: list[Any] = []
    if out["torch_cuda"]:
        sides.append(ReferenceSide(bundle_dir, device="cuda"))
    if out["onnxruntime_cuda"]:
        sides.append(VertrefineSide(bundle_dir, device="cuda"))
    for side in sides:
        warm_up(side, None, spine, vertebra)
    for side in sides:
        out[side.name] = {
            "vertebra": summarize(time_cases(side, [vertebra], "vertebra")),
            "spine": summarize(time_cases(side, [spine], "spine")),
        }
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def print_steady(results: dict[str, Any]) -> None:
    print(f"\n{'side':11s} {'case':16s} {'n':>2s} {'wall s':>8s} " + " ".join(f"{s:>8s}" for s in STAGES))
    for side in ("reference", "vertrefine"):
        for case, label in (("vertebra", "1 vertebra"), ("spine", "spine (5 vert.)")):
            block = results[side][case]
            median = block["median"]
            cells = " ".join(f"{median[s]:8.3f}" for s in STAGES)
            print(f"{side:11s} {label:16s} {block['n']:2d} {median['total']:8.3f} {cells}")
    print("(medians; stages in seconds; other = resampling, cropping, stitching, back to the input grid)")
    per = {side: results[side]["spine"]["median"]["total"] / 5 for side in ("reference", "vertrefine")}
    print(
        f"per vertebra within a spine (spine / 5): reference {per['reference']:.3f} s, "
        f"vertrefine {per['vertrefine']:.3f} s"
    )


def print_whole(results: dict[str, Any]) -> None:
    print(f"\n{'side':11s} {'runs':>4s} {'wall s':>8s} {'peak RSS MiB':>13s}  command")
    for side, block in results.items():
        command = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(block["runs"][0]["command"]))
        wall, peak = block["median_wall_s"], block["peak_rss_mib"]
        print(f"{side:11s} {len(block['runs']):4d} {wall:8.2f} {peak:13.0f}  {command}")


def print_flops(rows: list[dict[str, Any]], peak: dict[str, float]) -> None:
    size, repeats = peak["size"], peak["repeats"]
    print(f"sgemm peak: numpy float32 {size} x {size} matmul, median of {repeats}: {peak['gflops']:.1f} GFLOP/s")
    print(f"{'runtime':22s} {'model':8s} {'batch':>5s} {'median s':>9s} {'GFLOP/s':>8s} {'% peak':>7s}")
    for r in rows:
        print(
            f"{r['runtime']:22s} {r['model']:8s} {r['batch']:5d} {r['median_s']:9.4f} {r['gflops']:8.1f} "
            f"{r['percent_of_peak']:6.1f}%"
        )


def print_training(recipes: dict[str, Any], measured: dict[str, Any] | None) -> None:
    print("measured by training (bundle manifests' recipe):")
    for name, r in recipes.items():
        hw = r.get("hardware") or {}
        hardware = f"{hw.get('device')}, {hw.get('cpu')}, {hw.get('cpu_cores')} cores, torch {hw.get('torch')}"
        note = f"; {r['exported_as']}" if r.get("exported_as") else ""
        print(
            f"  {name:8s} trained as {r.get('model')}: {r.get('seconds_per_epoch')} s/epoch x {r.get('epochs')} epochs "
            f"= {r.get('seconds')} s, batch {r.get('batch_size')}, {r.get('train_patches')} patches ({hardware}){note}"
        )
    if measured is None:
        print("measured training steps: skipped (--quick)")
        return
    print(
        f"measured here, batch {measured['batch']} on random 64^3 soft patches (no data loading, no validation); "
        f"EXTRAPOLATED to {measured['epoch_patches']} patches = {measured['steps_per_epoch']} steps:"
    )
    for kind in ("vae", "lebm", "lsd-ebm"):
        m = measured[kind]
        print(f"  {kind:8s} {m['median_step_s']:.2f} s/step -> {m['epoch_s_extrapolated']:.0f} s/epoch (extrapolated)")


def resolve_threads(value: str) -> int:
    """CPU threads for both sides: a number, or "auto": the cores that other processes leave free
    (cores - the 1-minute load average, rounded; at least 1)."""
    cores = os.cpu_count() or 1
    if value != "auto":
        return max(1, int(value))
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    bundle_dir = Path(args.bundle) if args.bundle else default_bundle_dir("lsd-ebm")
    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "quick": quick,
        "bundle": str(bundle_dir),
        "threads": threads,
        "threads_option": args.threads,
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "reference_settings": {**asdict(REFERENCE), "threshold": REFERENCE_THRESHOLD},
    }
    m = results["machine"]
    print(f"bundle {bundle_dir}; {'quick' if quick else 'full'} run")
    print(
        f"machine: {m['cpu']}, {m['cpu_cores']} cores; torch {m['torch']}, ONNX Runtime {m['onnxruntime']}; "
        f"load average {results['load_average_before'][0]:.2f}"
    )
    print(
        f"threads: {threads} for both sides (torch.set_num_threads; ONNX Runtime intra-op "
        f"{'default: all cores' if threads == cores else threads})"
        + (f" -- --threads auto left {cores - threads} core(s) to other processes" if threads < cores else "")
    )

    n_spines = args.spines or (3 if quick else 5)
    n_reference = 3 if quick else 5
    seeds = [FIRST_SEED + i for i in range(max(n_spines, n_reference))]
    print(f"\n== Cases: spines of seeds {seeds[0]}..{seeds[-1]}, degraded {SLICE_MM:g} mm {AXIS} ==", flush=True)
    spines = [(seed, make_spine(seed)) for seed in seeds]
    vertebrae = [(seed, single_vertebra(spine, seed)) for seed, spine in spines]
    results["cases"] = {"spine_seeds": seeds, "single_vertebra_labels": [LUMBAR[s % 5] for s in seeds]}

    print("\n== In-process steady state (after a warm-up run of each side) ==", flush=True)
    reference = ReferenceSide(bundle_dir)
    vertrefine = VertrefineSide(bundle_dir, threads=0 if threads == cores else threads)
    warm_up(reference, vertrefine, spines[0], vertebrae[0])
    steady: dict[str, Any] = {}
    for side, n in ((vertrefine, n_spines), (reference, n_reference)):
        steady[side.name] = {
            "vertebra": summarize(time_cases(side, vertebrae[:n], "vertebra")),
            "spine": summarize(time_cases(side, spines[:n], "spine")),
        }
    results["in_process"] = steady
    print_steady(steady)

    print("\n== FLOP efficiency: encoder and decoder (manifest FLOPs per patch x batch / median time) ==", flush=True)
    peak = sgemm_peak(threads)
    manifest = read_manifest(bundle_dir)
    flops = manifest["flops"]
    rows = flop_efficiency(reference, vertrefine, flops, peak["gflops"], repeats=3 if quick else 7)
    results["sgemm_peak"] = peak
    results["flops_per_patch"] = flops
    results["flop_efficiency"] = rows
    print_flops(rows, peak)
    del reference, vertrefine

    print("\n== Whole process, one spine, fresh subprocess (wall time and peak RSS per side) ==", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spine_file = write_label_map(spines[0][1], folder / f"spine_{spines[0][0]}.nii.gz")
        runs = (1, 1) if quick else (2, 3)
        whole = whole_process(bundle_dir, spine_file, folder, threads, *runs)
    results["whole_process"] = whole
    print_whole(whole)

    print("\n== Training cost ==", flush=True)
    bundles = {"lsd-ebm": bundle_dir}
    vae_dir = bundle_dir.parent / "vae"
    if (vae_dir / "manifest.json").is_file():
        bundles["vae"] = vae_dir
    results["training_recipe"] = recipe_costs(bundles)
    measured = None
    if not quick:
        measured = training_step_times(bundle_dir, steps=args.training_steps)
    results["training_measured"] = measured
    print_training(results["training_recipe"], measured)

    print("\n== GPU ==", flush=True)
    if torch.cuda.is_available() or cuda_usable():
        gpu = gpu_timings(bundle_dir, spines[0], vertebrae[0])
        label = gpu.get("device_name", "CUDA GPU")
        for side in ("reference", "vertrefine"):
            if side in gpu:
                v, s = gpu[side]["vertebra"]["median"]["total"], gpu[side]["spine"]["median"]["total"]
                print(f"{side:11s} on {label}: 1 vertebra {v:.3f} s, spine {s:.3f} s")
        if "reference" not in gpu:
            print("reference on CUDA: not run (torch.cuda.is_available() is False)")
        if "vertrefine" not in gpu:
            print("vertrefine on CUDA: not run (ONNX Runtime's CUDA provider is not usable)")
    else:
        gpu = {"torch_cuda": False, "onnxruntime_cuda": False}
        print("no GPU was available (torch.cuda.is_available() is False, ONNX Runtime's CUDA provider not usable)")
    results["gpu"] = gpu

    reference_spine = steady["reference"]["spine"]["median"]["total"]
    vertrefine_spine = steady["vertrefine"]["spine"]["median"]["total"]
    results["speedup_per_spine"] = reference_spine / vertrefine_spine
    results["load_average_after"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats, no training steps")
    parser.add_argument("--json", type=Path, help="write every figure measured here")
    parser.add_argument("--bundle", type=Path, help="lsd-ebm bundle (default: the shipped one)")
    parser.add_argument(
        "--spines", type=int, help="spines (and single vertebrae) for vertrefine (default 3 quick, 5 full)"
    )
    parser.add_argument(
        "--threads",
        default="auto",
        help="CPU threads for both sides: N, or auto (the cores other processes leave free)",
    )
    parser.add_argument("--training-steps", type=int, default=3, help="timed training steps per kind (full run)")
    parser.add_argument("--reference-case", nargs=2, type=Path, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_case:
        threads = resolve_threads(args.threads)
        run_reference_case(*args.reference_case, args.bundle or default_bundle_dir("lsd-ebm"), threads)
        return
    started = time.perf_counter()
    results = run(args)
    results["benchmark_seconds"] = time.perf_counter() - started
    print(f"\nload average after: {results['load_average_after'][0]:.2f}; {results['benchmark_seconds']:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    reference_spine = results["in_process"]["reference"]["spine"]["median"]["total"]
    vertrefine_spine = results["in_process"]["vertrefine"]["spine"]["median"]["total"]
    print(
        f"speedup {results['speedup_per_spine']:.1f}x per spine "
        f"(reference {reference_spine:.2f} s, vertrefine {vertrefine_spine:.2f} s)"
    )


if __name__ == "__main__":
    main()
