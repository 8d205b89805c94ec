"""The sidecar is one record type (issue 13): the file written, the record's fields and the README's tables
list the same keys in the same order."""

import json
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
from cli_helpers import invoke

from vertrefine import io
from vertrefine.cases import case_seed
from vertrefine.refine import Refiner
from vertrefine.sidecar import Sidecar, VertebraRecord, bundle_digests, sidecar_path
from vertrefine.synth import synth_spine

ROOT = Path(__file__).resolve().parent.parent
TOP = [f.name for f in fields(Sidecar)]
ROW = [f.name for f in fields(VertebraRecord)]


def _readme_tables() -> list[list[str]]:
    """The first-column keys of each table in the README's 'The sidecar' section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^### The sidecar\n(.*?)^#", readme, re.S | re.M).group(1)
    tables: list[list[str]] = []
    for block in re.split(r"\n\s*\n", section):
        keys = re.findall(r"^\| `([a-z0-9_]+)` \|", block, re.M)
        if keys:
            tables.append(keys)
    return tables


def test_the_readme_tables_list_the_sidecar_keys_in_the_order_written():
    assert _readme_tables() == [TOP, ROW]


def _spine_with_a_speck(seed: int):
    """A 1 mm L3 with a single voxel labelled T12: L3 is refined, the speck passed through."""
    spine = synth_spine(seed, levels=("L3",))
    array = spine.array.copy()
    array[2, 2, 2] = 19
    return spine.with_array(array)


def test_a_written_sidecar_has_the_records_keys_in_order(tmp_path):
    io.write_label_map(_spine_with_a_speck(56), tmp_path / "in.nii.gz")
    fast = ("--t-refine", "2", "--langevin-steps", "5", "--fine-inputs", "refine", "--samples", "2")
    result = invoke("refine", tmp_path / "in.nii.gz", "-o", tmp_path / "out.nii.gz", *fast, "--seed", "2")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out.json").read_text(encoding="utf-8")
    record = json.loads(text)
    assert list(record) == TOP
    refined, speck = record["vertebrae"]
    assert list(refined) == ROW and refined["decision"] != "passed through"  # mean_std_inside with 2 samples
    assert list(speck) == ROW[:-1] and speck["decision"] == "passed through"  # no spread: not sampled
    assert record["passed_through_labels"] == [19] and record["case_seed"] == case_seed(2, "in")
    assert text.endswith("}\n") and text.startswith('{\n  "vertrefine": ')


def test_the_api_builds_writes_and_reads_back_the_same_record(tmp_path):
    volume = _spine_with_a_speck(57)
    refiner = Refiner.from_bundle(model="vae", device="cpu", fine_inputs="refine")
    prepared = refiner.prepare(volume)
    (z,) = refiner.sample([prepared], [np.random.default_rng(0)])
    refined = refiner.finish(prepared, z)
    sidecar = Sidecar.of(
        prepared,
        refined,
        refiner=refiner,
        source=tmp_path / "in.nii.gz",
        destination=tmp_path / "out.nii.gz",
        model=bundle_digests(refiner.sessions),
        extra_outputs={"meshes": [tmp_path / "m" / "L3.stl"]},
        seed=1,
        case_seed=case_seed(1, "in"),
        created_utc="2025-01-31T12:00:00Z",
    )
    path = sidecar_path(tmp_path / "out.nii.gz")
    sidecar.write(path)
    assert path.name == "out.json" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no .part left
    assert path.read_text(encoding="utf-8") == sidecar.to_json()
    record = json.loads(sidecar.to_json())
    assert record == sidecar.to_dict() and list(record) == TOP
    assert record["created_utc"] == "2025-01-31T12:00:00Z" and record["threads"] == "all"
    assert record["settings"]["sampler"] is None and record["model"]["kind"] == "vae"  # the VAE samples nothing
    assert record["extra_outputs"] == {"meshes": [str(tmp_path / "m" / "L3.stl")]}
    assert [row["decision"] for row in record["vertebrae"]][-1] == "passed through"
    assert all(list(row) == ROW[:-1] for row in record["vertebrae"])  # one sample: no mean_std_inside
    assert record["warnings"] == sidecar.warnings and any(w.startswith("T12:") for w in record["warnings"])
