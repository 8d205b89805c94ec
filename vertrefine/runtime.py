"""ONNX Runtime: which execution providers really work here, and sessions over a model bundle.

``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU, and asking for it there
logs a loud error before falling back to the CPU. So CUDA is only requested after a silent probe
(driver library present, then a one-node session that must actually run on CUDA).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Literal

import numpy as np

from .bundle import Bundle, io_spec
from .errors import InputError, VertrefineError

Device = Literal["auto", "cpu", "cuda"]  # vertrefine.conventions.DEVICES, as a type

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _probe_model_bytes() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    # ONNX Runtime 1.31 refuses IR version 14, the default of onnx 1.23's helpers.
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when ONNX Runtime can really run a model on a CUDA GPU here (probed silently, cached)."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(_probe_model_bytes(), options, providers=[CUDA, CPU])
    except Exception:  # noqa: BLE001 - any failure of the probe means "not usable"
        return False
    return session.get_providers()[0] == CUDA


def working_providers() -> list[str]:
    """Execution providers that work on this machine, best first."""
    return [CUDA, CPU] if cuda_usable() else [CPU]


def select_providers(device: Device = "auto") -> tuple[list[str], str | None]:
    """Providers for ``device`` and, when the request cannot be met, a one-line note saying so."""
    if device == "cpu":
        return [CPU], None
    if cuda_usable():
        return [CUDA, CPU], None
    if device == "cuda":
        return [CPU], "CUDA was requested but is not usable here (no GPU or CUDA libraries); using the CPU"
    return [CPU], None


# --------------------------------------------------------------------------------------------------
# Sessions over a bundle
# --------------------------------------------------------------------------------------------------


def _session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement chatter
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _open_session(path: Path, name: str, bundle: Bundle, providers: list[str], options):
    """An ONNX Runtime session for ``path`` whose inputs and outputs match the bundle format."""
    import onnxruntime as ort

    remedy = "the bundle is damaged or was not written by `vertrefine export`; re-export or re-download it"
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several types for unreadable models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"ONNX Runtime cannot load the {name} model ({first_line[:200]})", remedy) from None
    spec = io_spec(name, bundle.latent_shape, bundle.patch, bundle.conditioned)
    got_in = sorted(i.name for i in session.get_inputs())
    got_out = sorted(o.name for o in session.get_outputs())
    if got_in != sorted(spec["inputs"]) or got_out != sorted(spec["outputs"]):
        raise InputError(
            path,
            f"the {name} model has inputs {got_in} and outputs {got_out}, "
            f"expected {sorted(spec['inputs'])} and {sorted(spec['outputs'])}",
            remedy,
        )
    return session


class BundleSessions:
    """ONNX Runtime sessions of a bundle's models, called with numpy arrays in batches.

    ``encode`` and ``decode`` split large batches into chunks of ``batch_size`` patches to bound memory
    (each 128^3 patch is 8 MB in and out); ``energy_and_grad`` has the sampler's signature.
    """

    def __init__(self, bundle: Bundle, providers: list[str], threads: int = 0, batch_size: int = 4) -> None:
        options = _session_options(threads)
        self.bundle = bundle
        self.batch_size = max(1, int(batch_size))
        self.sessions = {
            name: _open_session(path, name, bundle, providers, options)
            for name, path in bundle.files.items()
        }
        self.providers = self.sessions["encoder"].get_providers()

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == CUDA else "cpu"

    def encode(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mu, logvar), each [B, *Z] (the bundle's latent shape), of binary patches [B, P, P, P]."""
        mus, logvars = [], []
        for start in range(0, len(patches), self.batch_size):
            x = np.ascontiguousarray(patches[start : start + self.batch_size, None], dtype=np.float32)
            mu, logvar = self.sessions["encoder"].run(["mu", "logvar"], {"x": x})
            mus.append(mu)
            logvars.append(logvar)
        shape = (0, *self.bundle.latent_shape)
        if not mus:
            return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        return np.concatenate(mus), np.concatenate(logvars)

    def decode_chunks(self, z: np.ndarray, x: np.ndarray | None = None):
        """Yield (start row, probabilities [b, P, P, P]) for the rows of ``z`` [B, *Z], a chunk at a time.

        A conditioned bundle's decoder also takes each row's input patch: ``x`` [B, P, P, P] (binary, what the
        row's encoder was given); the others take none. Raises ValueError when ``x`` is missing or not wanted.
        """
        if self.bundle.conditioned != (x is not None):
            raise ValueError("a conditioned decoder needs the input patches x; another decoder takes none")
        if x is not None and len(x) != len(z):
            raise ValueError(f"{len(x)} input patches for {len(z)} latents")
        for start in range(0, len(z), self.batch_size):
            feed = {"z": np.ascontiguousarray(z[start : start + self.batch_size], dtype=np.float32)}
            if x is not None:
                feed["x"] = np.ascontiguousarray(x[start : start + self.batch_size, None], dtype=np.float32)
            (probability,) = self.sessions["decoder"].run(["probability"], feed)
            yield start, probability[:, 0]

    def energy_and_grad(self, z: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """E(z, t) [B] and dE/dz [B, *Z] (the exported exact gradient)."""
        if "energy" not in self.sessions:
            raise VertrefineError(f"the {self.bundle.kind} bundle at {self.bundle.dir} has no energy model")
        energy, grad = self.sessions["energy"].run(
            ["energy", "grad"], {"z": np.ascontiguousarray(z, dtype=np.float32), "t": t.astype(np.int64)}
        )
        return energy, grad


def open_sessions(
    bundle: Bundle, device: Device = "auto", threads: int = 0, batch_size: int = 4
) -> tuple[BundleSessions, str | None]:
    """Sessions for ``bundle`` on ``device`` and the one-line fallback note (None when the request is met)."""
    providers, note = select_providers(device)
    return BundleSessions(bundle, providers, threads=threads, batch_size=batch_size), note
