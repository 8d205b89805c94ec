"""Rebuild the torch model of a bundle: its manifest's model_config, the weights from its ONNX files.

A bundle carries no torch checkpoint, but its ONNX files hold every weight as a graph initializer. How the
exporter names them (``vertrefine.train.export``, TorchScript exporter, as in the shipped bundles): by the
parameter's name relative to the exported module, i.e. ``features.0.0.weight`` in encoder.onnx (the
encoder itself is exported), ``decoder.fc.weight`` in decoder.onnx and ``energy.inp.weight`` in
energy.onnx (wrappers holding ``decoder`` / ``energy``). Two exporter habits break the one-to-one naming:

* the TorchScript exporter merges initializers of equal value, so an untrained model's GroupNorm weights
  (all ones) and biases (all zeros) of equal width survive as one initializer, named after the first;
* other exporters or versions may rename weights (``onnx::Conv_123``, ``p_features_0_0_weight``).

So parameters are mapped in two passes: by name (initializers and their Identity copies; exact, then with
``.``/``_`` and a ``p_`` prefix normalised), then by graph position: a run of unnamed parameters between two
named ones (in the module's parameter order, which is the order its forward pass uses them) is matched, in
order and by shape (a 2-D weight may be stored transposed), against the unclaimed weights that the graph
first uses between the first uses of those two named neighbours. Exactly one such assignment must exist:
none or several (e.g. two same-shaped candidates for one bias) is refused with an InputError naming the
parameters. With ``verify`` (default), the rebuilt torch modules must then reproduce ONNX Runtime on a
random batch, as the exporter's own check does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..bundle import load_bundle, model_names
from ..errors import InputError
from .export import PARITY_GUARD, example_inputs, export_modules, parity_errors
from .models import ModelConfig, VertebraModel

_log = logging.getLogger(__name__)
_REMEDY = "re-export the bundle with `vertrefine export RUN_DIR -o DIR` from its training run"


def _normalise(name: str) -> str:
    """``p_decoder_fc_weight`` / ``decoder.fc.weight`` -> ``decoder_fc_weight``."""
    text = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")
    return text[2:] if text.startswith("p_") else text


def _weight_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Graph values that can hold weights, by name: float initializers of rank >= 1 (not shape constants or
    scalars) and Identity copies of them (the TorchScript exporter's merged duplicates:
    ``features.0.4.weight = Identity(features.0.1.weight)``)."""
    values = {}
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.ndim >= 1 and np.issubdtype(array.dtype, np.floating):
            values[tensor.name] = array
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _use_sequence(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> list[str]:
    """Weight values in the order the graph's computing nodes use them (one entry per use)."""
    return [
        name
        for node in graph.node
        if not (node.op_type == "Identity" and node.input[0] in values)
        for name in node.input
        if name in values
    ]


def _match_by_name(keys: Sequence[str], prefix: str, values: dict[str, np.ndarray], path: Path) -> dict[str, str]:
    """{parameter key: weight name} for the keys whose weight can be told by its name."""
    exact = set(values)
    normalised: dict[str, list[str]] = {}
    for name in values:
        normalised.setdefault(_normalise(name), []).append(name)
    found = {}
    for key in keys:
        candidates = [key, f"{prefix}.{key}"]
        hits = [c for c in candidates if c in exact]
        if not hits:
            hits = sorted({n for c in candidates for n in normalised.get(_normalise(c), [])})
        if len(hits) > 1:
            raise InputError(
                path, f"cannot map the ONNX weights: parameter {key} matches several weights {hits}", _REMEDY
            )
        if hits:
            found[key] = hits[0]
    return found


def _oriented(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``array`` as a parameter of ``shape``: as it is, or transposed for a folded (in, out) matrix."""
    if array.shape == shape:
        return array
    if array.ndim == 2 and array.shape[::-1] == shape:
        return array.T
    return None


def _unique_embedding(run: list[tuple[int, ...]], window: list[np.ndarray]) -> list[int] | None:
    """Indices into ``window`` of the one in-order, shape-compatible assignment of ``run``; None if there
    is none or more than one."""
    n, m = len(run), len(window)
    fits = [[_oriented(window[j], run[i]) is not None for j in range(m)] for i in range(n)]
    ways = [[0] * (m + 1) for _ in range(n + 1)]  # ways[i][j]: embeddings of run[i:] in window[j:], capped at 2
    ways[n] = [1] * (m + 1)
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            ways[i][j] = min(2, ways[i][j + 1] + (ways[i + 1][j + 1] if fits[i][j] else 0))
    if ways[0][0] != 1:
        return None
    chosen, j = [], 0
    for i in range(n):
        while not (fits[i][j] and ways[i + 1][j + 1] == 1 and ways[i][j + 1] == 0):
            j += 1
        chosen.append(j)
        j += 1
    return chosen


def _match_by_position(
    keys: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    named: dict[str, str],
    values: dict[str, np.ndarray],
    uses: list[str],
    path: Path,
) -> dict[str, str]:
    """Map each run of unnamed parameters (in module order) onto the weights that the graph first uses
    between the first uses of its named neighbours: the one in-order, shape-compatible assignment."""
    first_use: dict[str, int] = {}
    for position, name in enumerate(uses):
        first_use.setdefault(name, position)
    taken = set(named.values())
    found: dict[str, str] = {}
    index = 0
    while index < len(keys):
        if keys[index] in named:
            index += 1
            continue
        end = index
        while end < len(keys) and keys[end] not in named:
            end += 1
        run = list(keys[index:end])
        low = first_use.get(named[keys[index - 1]], -1) if index > 0 else -1
        high = first_use.get(named[keys[end]], len(uses)) if end < len(keys) else len(uses)
        window: list[str] = []
        for name in uses[low + 1 : high]:
            if name not in window and name not in taken:
                window.append(name)
        shapes_run = [shapes[k] for k in run]
        chosen = _unique_embedding(shapes_run, [values[n] for n in window]) if low < high else None
        if chosen is None:
            raise InputError(
                path,
                f"cannot map the ONNX weights to the model: parameters {run} (shapes {shapes_run}) are not named "
                "in the graph, and the weights it uses in their place fit them in none or several ways (ambiguous): "
                f"{[(n, tuple(values[n].shape)) for n in window]}",
                _REMEDY,
            )
        found.update((key, window[j]) for key, j in zip(run, chosen, strict=True))
        index = end
    return found


def module_state_from_onnx(module: nn.Module, prefix: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of ``module`` (exported as ``path``) read from the ONNX file's weights.

    ``prefix`` is the attribute name of ``module`` in the exported wrapper ("decoder", "energy"); names are
    tried with and without it. Raises InputError when a parameter cannot be mapped unambiguously.
    """
    path = Path(path)
    graph = onnx.load(str(path)).graph
    values = _weight_values(graph)
    state = module.state_dict()
    keys = list(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    named = _match_by_name(keys, prefix, values, path)
    for key, name in named.items():
        if _oriented(values[name], shapes[key]) is None:
            raise InputError(
                path,
                f"weight {name} has shape {values[name].shape}, the model's {key} {shapes[key]}",
                "the manifest's model_config does not describe these weights; " + _REMEDY,
            )
    mapping = dict(named)
    if len(named) < len(keys):
        uses = _use_sequence(graph, values)
        mapping.update(_match_by_position(keys, shapes, named, values, uses, path))
        _log.info("%s: %d of %d parameters mapped by graph position", path.name, len(keys) - len(named), len(keys))
    return {key: torch.from_numpy(np.array(_oriented(values[mapping[key]], shapes[key]), np.float32)) for key in keys}


def _verify(model: VertebraModel, files: dict[str, Path], seed: int = 0) -> None:
    """ONNX Runtime and the rebuilt torch modules must agree on a random batch (the exporter's guard)."""
    generator = torch.Generator().manual_seed(seed)
    modules = export_modules(model)
    for name, path in files.items():
        errors = parity_errors(path, modules[name], example_inputs(name, model.config, 1, generator))
        if max(errors.values()) > PARITY_GUARD:
            raise InputError(
                path,
                f"the torch model rebuilt from the bundle differs from ONNX Runtime by {errors} (relative): "
                "the weights were mapped wrongly or the manifest's model_config does not match the files",
                _REMEDY,
            )


def model_from_bundle(bundle_dir: str | Path, *, verify: bool = True) -> VertebraModel:
    """The torch VertebraModel of a bundle (eval mode, CPU), its weights read from the ONNX files.

    The bundle is checked as refine checks it (manifest, sha256). The architecture comes from the manifest's
    ``model_config``; a VAE bundle has no energy.onnx and gives a model without energy. With ``verify``, each
    rebuilt module is compared with ONNX Runtime on a random batch of one (a few seconds at full size).
    """
    bundle = load_bundle(bundle_dir)
    manifest_path = bundle.dir / "manifest.json"
    try:
        config = ModelConfig.from_dict(dict(bundle.manifest["model_config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(manifest_path, f"no usable model_config in the manifest ({exc})", _REMEDY) from None
    if config.kind != bundle.kind or config.latent_shape != bundle.latent_shape or config.patch != bundle.patch:
        raise InputError(
            manifest_path,
            f"model_config ({config.kind}, latent {config.latent_shape}, patch {config.patch}) contradicts the "
            f"manifest ({bundle.kind}, latent {bundle.latent_shape}, patch {bundle.patch})",
            _REMEDY,
        )
    model = VertebraModel(config).eval()
    for name in model_names(bundle.kind):
        module = getattr(model, name)
        module.load_state_dict(module_state_from_onnx(module, name, bundle.files[name]))
    if verify:
        _verify(model, bundle.files)
    return model
