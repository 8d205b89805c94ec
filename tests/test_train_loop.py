"""Training loop: one epoch per model kind, logs/checkpoints/bundle, exact resume, the DDP path, bad checkpoints."""

from __future__ import annotations

import csv
import json
import socket
import sys
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from vertrefine.errors import InputError, VertrefineError  # noqa: E402
from vertrefine.sampler import SamplerSettings  # noqa: E402
from vertrefine.schedule import DiffusionSchedule  # noqa: E402
from vertrefine.synth import write_synth_dataset  # noqa: E402
from vertrefine.train import loop  # noqa: E402
from vertrefine.train.config import PRESETS, TrainConfig  # noqa: E402
from vertrefine.train.distributed import epoch_order  # noqa: E402
from vertrefine.train.patch_cache import build_patch_cache  # noqa: E402

MICRO = {
    "epochs": 1,
    "batch_size": 2,
    "lr": 1e-3,
    "latent": 2,
    "latent_grid": 16,
    "res_blocks": 1,
    "encoder_widths": (4, 8),
    "decoder_widths": (8, 4),
    "energy_widths": (4, 4, 4),
    "langevin_steps": 2,
    "posterior_steps": 1,
    "val_fraction": 0.3,
    "checkpoint_every": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models gain nothing from a second thread, and a shared CI machine turns OpenMP's spin-waiting
    into long stalls; one thread keeps the timing steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Three synthetic spines, two levels each: 6 patches; one spine (2 patches) goes to validation."""
    root = tmp_path_factory.mktemp("traindata")
    (root / "data").mkdir()
    write_synth_dataset(root / "data", 3, 910_000, levels=("L2", "L3"))
    build_patch_cache(root / "data", root / "cache")
    return root / "cache"


def micro_config(tmp_path, cache_dir, name="run", **changes) -> TrainConfig:
    """A micro run's config, built as from the command line's options (``langevin_steps`` included)."""
    return TrainConfig.from_dict({"out": str(tmp_path / name), "cache_dir": str(cache_dir), **MICRO, **changes})


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model_state"]


@pytest.mark.parametrize("kind", ["vae", "lebm", "lsd-ebm"])
def test_one_epoch_writes_log_checkpoints_and_bundle(tmp_path, cache_dir, kind):
    events = []
    run_dir = loop.train(micro_config(tmp_path, cache_dir, model=kind), on_event=lambda k, p: events.append((k, p)))

    kinds = [k for k, _ in events]
    assert kinds[0] == "setup" and kinds[-1] == "done"
    assert {"epoch_start", "step", "epoch_end", "export_start", "export_end"} <= set(kinds)
    setup = dict(events)["setup"]
    assert (setup["train_patches"], setup["val_patches"], setup["cases"]) == (4, 2, 3)

    with open(run_dir / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and rows[0]["step"] == "2"
    assert {"loss", "recon", "kl", "val_dice", "val_recon", "seconds", "time", "lr"} <= set(rows[0])
    if kind != "vae":
        assert {"energy_pos", "energy_neg"} <= set(rows[0])
    assert 0.0 <= float(rows[0]["val_dice"]) <= 1.0

    assert TrainConfig.load(run_dir / "config.json").model == kind
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # plain containers only
    assert (run_dir / "checkpoints" / "epoch_0001.pt").is_file()
    assert state["epoch"] == 1 and state["model_config"]["kind"] == kind
    assert {"model_state", "optimizer_state", "schedule", "sampler_defaults", "recipe", "metrics", "rng"} <= set(state)

    manifest = json.loads((run_dir / "bundle" / "manifest.json").read_text())
    assert manifest["kind"] == kind
    assert manifest["metrics"]["val_dice"] == pytest.approx(float(rows[0]["val_dice"]), rel=1e-4)
    assert manifest["recipe"]["data"]["patches"] == 6 and manifest["recipe"]["epochs"] == 1
    assert (run_dir / "bundle" / "energy.onnx").is_file() == (kind != "vae")


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, cache_dir):
    straight = loop.train(micro_config(tmp_path, cache_dir, "straight", model="lsd-ebm", epochs=3, export=False))

    first = loop.train(micro_config(tmp_path, cache_dir, "resumed", model="lsd-ebm", epochs=2, export=False))
    with pytest.raises(InputError, match="--resume"):  # a new run must not overwrite it
        loop.train(micro_config(tmp_path, cache_dir, "resumed", model="lsd-ebm", epochs=3, export=False))
    resumed_config = TrainConfig.from_options(out=first, resume=True, epochs=3)
    assert resumed_config.epochs == 3 and resumed_config.latent == MICRO["latent"]
    resumed = loop.train(resumed_config)

    want, got = final_weights(straight), final_weights(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    with open(resumed / "log.csv", newline="") as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1", "2", "3"]

    with pytest.raises(InputError, match="latent"):
        TrainConfig.from_options(out=first, resume=True, latent=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_path_with_gloo_in_one_process_matches_the_plain_run(tmp_path, cache_dir, monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    from vertrefine.train import distributed

    plain = loop.train(micro_config(tmp_path, cache_dir, "plain", model="vae", export=False))

    wrapped = []
    wrap = distributed.data_parallel
    monkeypatch.setattr(loop, "data_parallel", lambda *a: wrapped.append(wrap(*a)) or wrapped[-1])
    torchrun_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    for key, value in torchrun_env.items():
        monkeypatch.setenv(key, value)
    ddp = loop.train(micro_config(tmp_path, cache_dir, "ddp", model="vae", export=False))

    assert len(wrapped) == 1 and isinstance(wrapped[0], DistributedDataParallel)  # torch's own DDP did the steps
    assert not torch.distributed.is_initialized()  # the loop's own process group is torn down
    want, got = final_weights(plain), final_weights(ddp)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_machine_without_the_export_stack_still_keeps_the_trained_run(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vertrefine.train.export", None)  # importing it raises ImportError
    events = []
    run_dir = loop.train(micro_config(tmp_path, cache_dir, model="vae"), on_event=lambda k, p: events.append((k, p)))
    assert any(k == "warning" and "vertrefine export" in p["message"] for k, p in events)
    assert dict(events)["done"]["bundle"] is None and not (run_dir / "bundle").exists()
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_tiny_preset_without_data_trains_on_its_own_synthetic_spines(tmp_path):
    config = TrainConfig.from_options("tiny", out=tmp_path / "tiny", model="vae", epochs=1, export=False, device="cpu")
    run_dir = loop.train(config)
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == [f"spine_{500_000 + i}.nii.gz" for i in range(3)]
    recipe = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["recipe"]
    assert (recipe["data"]["cases"], recipe["data"]["patches"]) == (3, 15)
    assert recipe["data"]["train_patches"] + recipe["data"]["val_patches"] == 15 and recipe["data"]["val_patches"] > 0


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, cache_dir):
    first = loop.train(micro_config(tmp_path, cache_dir, "first", export=False))
    tuned = loop.train(
        micro_config(
            tmp_path, cache_dir, "tuned", export=False, init_from=str(first), kl_weight=0.1, lr=1e-12, energy_lr=1e-12
        )
    )
    start, end = final_weights(first), final_weights(tuned)
    for key in start:  # a vanishing learning rate: the tuned run ends where its start was
        torch.testing.assert_close(end[key], start[key], atol=1e-6, rtol=0)
    assert TrainConfig.load(tuned / "config.json").init_from == str(first)
    with pytest.raises(InputError, match="another model configuration"):
        loop.train(micro_config(tmp_path, cache_dir, "other", export=False, init_from=str(first), latent=3))


def test_epoch_order_shards_partition_a_seeded_permutation():
    whole = epoch_order(10, seed=3, epoch=2)
    assert sorted(whole) == list(range(10)) and whole == epoch_order(10, seed=3, epoch=2)
    assert whole != epoch_order(10, seed=3, epoch=3)
    shards = [epoch_order(10, seed=3, epoch=2, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {3} and set(sum(shards, [])) == set(range(10))


def test_missing_or_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path, cache_dir):
    config = micro_config(tmp_path, cache_dir, resume=True)
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        loop.train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="cannot be read as a checkpoint"):
        loop.train(config)
    torch.save({"model_state": {}}, checkpoints / "last.pt")
    with pytest.raises(InputError, match="not a vertrefine training checkpoint"):
        loop.train(config)


def test_config_presets_merge_and_json_round_trip(tmp_path):
    tiny = TrainConfig.from_options("tiny", out=tmp_path / "t", model="vae", epochs=None, lr=5e-4)
    assert tiny.latent == PRESETS["tiny"]["latent"] and tiny.epochs == PRESETS["tiny"]["epochs"]
    assert (tiny.lr, tiny.model, tiny.data_dir) == (5e-4, "vae", None)
    assert TrainConfig.from_json(tiny.to_json()) == tiny

    default = TrainConfig.from_options(out=tmp_path / "d", data_dir=tmp_path, model="lebm")
    assert (default.latent, default.latent_grid, default.lr, default.energy_lr) == (8, 16, 3e-4, 1e-4)
    paper = TrainConfig.from_options("paper", out=tmp_path / "p", data_dir=tmp_path)
    assert (paper.latent, paper.latent_grid, paper.energy_hidden, paper.chain.langevin_steps) == (100, 0, 1000, 60)
    assert TrainConfig.from_options("tiny", out=tmp_path / "t", model="lebm").energy_lr == 1e-4  # per-model value
    with pytest.raises(InputError, match="--data is required"):
        TrainConfig.from_options(out=tmp_path / "d")
    with pytest.raises(InputError, match="model must be one of"):
        replace(default, model="gan")


def test_the_training_chain_is_the_one_sampler_settings_type_and_old_configs_still_load(tmp_path):
    """--langevin-steps sets the chain the energy trains with, which the bundle's sampler defaults are."""
    config = TrainConfig.from_options(out=tmp_path / "r", data_dir=tmp_path, langevin_steps=7, timesteps=5)
    assert isinstance(config.chain, SamplerSettings) and config.chain.langevin_steps == 7
    assert TrainConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["chain"]["langevin_steps"] == 7
    exported = config.sampler_defaults()  # t_refine below the schedule's last step, every step guided
    assert (exported.t_refine, exported.guidance_steps, exported.langevin_steps) == (4, 4, 7)
    assert config.schedule() == DiffusionSchedule(timesteps=5, noise_scale=config.diffusion_noise_scale)
    # a run folder's config.json from before the chain was one field: flat langevin_* keys
    flat = {k: v for k, v in config.as_dict().items() if k != "chain"}
    flat.update(langevin_steps=7, langevin_step_size=0.002, langevin_noise_scale=0.01, langevin_init="noise")
    old = TrainConfig.from_dict(flat)
    assert (old.chain.langevin_steps, old.chain.step_size, old.chain.init) == (7, 0.002, "noise")
    with pytest.raises(InputError, match="init must be"):
        TrainConfig.from_dict({**flat, "langevin_init": "random"})
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(config.to_json())
    with pytest.raises(InputError, match="cannot change langevin_steps"):
        TrainConfig.from_options(out=tmp_path / "r", resume=True, langevin_steps=8)
    assert TrainConfig.from_options(out=tmp_path / "r", resume=True, langevin_steps=7).chain == config.chain


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(VertrefineError, match="no CUDA GPU"):
        loop.resolve_device("cuda")
    assert loop.resolve_device("auto").type == "cpu"
