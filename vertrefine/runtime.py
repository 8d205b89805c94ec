"""ONNX Runtime execution providers: which ones really work on this machine, and which to use.

``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU, and asking for it there
logs a loud error before falling back to the CPU. So CUDA is only requested after a silent probe
(driver library present, then a one-node session that must actually run on CUDA).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]

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
