"""Block checkpoints: SIGKILL mid-prune resumes bit-identically; bad or foreign checkpoints are refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infra.checkpoints import BlockCheckpoints
from infra.settings import Settings
from pruning_core.recipe import Recipe
from tests.conftest import WIKITEXT_VALID, save_tiny
from tests.workers import prune_worker

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 8
RECIPE = Recipe(method="sparsegpt", sparsity=0.5, calibration_samples=32, seq_len=128)


@pytest.fixture
def deep_model(tmp_path, tiny_tokenizer):
    return str(save_tiny(tmp_path / "deep-llama", tiny_tokenizer, num_hidden_layers=LAYERS))


def _prune(model_dir: str, home: Path, monkeypatch, recipe: Recipe = RECIPE):
    monkeypatch.setenv("SECATEUR_HOME", str(home))
    return prune_worker.run(model_dir, str(WIKITEXT_VALID), recipe)


def _weights(result) -> dict:
    return load_file(Path(result.path) / "model.safetensors")


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert a[name].equal(b[name]), f"{name} differs"


def _checkpoint_dir(home: Path) -> Path:
    folders = list((home / "work").glob("*/checkpoints"))
    assert len(folders) == 1
    return folders[0]


def test_sigkill_during_block_resumes_there_bit_identical(tmp_path, deep_model, monkeypatch):
    reference = _weights(_prune(deep_model, tmp_path / "reference", monkeypatch))

    home = tmp_path / "killed"
    env = {**os.environ, "SECATEUR_HOME": str(home), "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.prune_worker", deep_model, str(WIKITEXT_VALID), RECIPE.model_dump_json()],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (home / "work").is_dir() or not list((home / "work").glob("*/checkpoints/block-0002")):
        assert worker.poll() is None, "the worker finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    committed = sorted(p.name for p in _checkpoint_dir(home).glob("block-*"))
    assert 3 <= len(committed) < LAYERS, committed
    assert not (home / "models").exists() or not any((home / "models").rglob("model.safetensors"))

    resumed = _prune(deep_model, home, monkeypatch)
    assert resumed.resumed_from_block == len(committed)
    _assert_identical(_weights(resumed), reference)
    assert not _checkpoint_dir_exists(home), "a finished prune removes its checkpoints"
    assert len(resumed.block_errors) == LAYERS and all(e > 0 for e in resumed.block_errors)


def _checkpoint_dir_exists(home: Path) -> bool:
    return any((home / "work").glob("*/checkpoints"))


def _crashing_writer(blocks: int):
    """The real checkpoint writer for blocks 0..n-1, then a failure like a dying worker's."""
    original = BlockCheckpoints.write

    def write(checkpoints, index, *args, **kwargs):
        path = original(checkpoints, index, *args, **kwargs)
        if index + 1 >= blocks:
            raise RuntimeError("worker lost")
        return path

    return write


def _crash_after(blocks: int, deep_model: str, home: Path, monkeypatch, recipe: Recipe = RECIPE) -> Path:
    with monkeypatch.context() as patch:
        patch.setattr(BlockCheckpoints, "write", _crashing_writer(blocks))
        with pytest.raises(RuntimeError, match="worker lost"):
            _prune(deep_model, home, monkeypatch, recipe)
    return _checkpoint_dir(home)


def test_truncated_checkpoint_is_refused_and_recomputed(tmp_path, deep_model, monkeypatch, caplog):
    reference = _weights(_prune(deep_model, tmp_path / "reference", monkeypatch))
    home = tmp_path / "crashed"
    folder = _crash_after(4, deep_model, home, monkeypatch)
    weights = folder / "block-0003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated by a full disk, say

    with caplog.at_level(logging.WARNING, logger="infra.checkpoints"):
        resumed = _prune(deep_model, home, monkeypatch)
    assert "refused checkpoint" in caplog.text and "block-0003" in caplog.text
    assert resumed.resumed_from_block == 3  # block 3 is recomputed from block 2's saved outputs
    _assert_identical(_weights(resumed), reference)


def test_altered_inputs_fall_back_to_an_earlier_block(tmp_path, deep_model, monkeypatch):
    reference = _weights(_prune(deep_model, tmp_path / "reference", monkeypatch))
    home = tmp_path / "crashed"
    folder = _crash_after(4, deep_model, home, monkeypatch)
    inputs = folder / "block-0003" / "inputs.safetensors"
    data = bytearray(inputs.read_bytes())
    data[-8] ^= 0xFF  # one flipped byte in the saved activations
    inputs.write_bytes(bytes(data))

    resumed = _prune(deep_model, home, monkeypatch)
    assert resumed.resumed_from_block == 3  # block 2's inputs (the last two are kept) still verify
    _assert_identical(_weights(resumed), reference)


def test_checkpoint_of_another_recipe_is_never_used(tmp_path, deep_model, monkeypatch, caplog):
    other = Recipe(method="wanda", sparsity=0.5, calibration_samples=32, seq_len=128)
    foreign = _crash_after(4, deep_model, tmp_path / "other", monkeypatch, other)
    reference = _weights(_prune(deep_model, tmp_path / "reference", monkeypatch))

    home = tmp_path / "target"
    monkeypatch.setenv("SECATEUR_HOME", str(home))
    # Plant the wanda checkpoints where this sparsegpt run keeps its own.
    from tasks.calibrate import CalibrationSpec, make_calibration
    from tasks.fetch import snapshot_model
    from tasks.prune import run_fingerprint

    settings = Settings()
    snapshot = snapshot_model(deep_model, settings)
    calibration = make_calibration(
        snapshot, CalibrationSpec(data=str(WIKITEXT_VALID), **prune_worker.WORKER_CALIBRATION), settings
    )
    run = run_fingerprint(snapshot, calibration, RECIPE)
    assert run != run_fingerprint(snapshot, calibration, other)
    shutil.copytree(foreign, home / "work" / run / "checkpoints")

    with caplog.at_level(logging.WARNING, logger="infra.checkpoints"):
        result = _prune(deep_model, home, monkeypatch)
    assert "is not this run's" in caplog.text
    assert result.resumed_from_block == 0
    _assert_identical(_weights(result), reference)


def test_finished_prune_is_reused_not_redone(tmp_path, deep_model, monkeypatch):
    first = _prune(deep_model, tmp_path / "home", monkeypatch)
    stamp = (Path(first.path) / "model.safetensors").stat().st_mtime_ns
    second = _prune(deep_model, tmp_path / "home", monkeypatch)
    assert second == first
    assert (Path(second.path) / "model.safetensors").stat().st_mtime_ns == stamp


def test_mirrored_checkpoints_resume_on_another_machine(tmp_path, deep_model, monkeypatch):
    reference = _weights(_prune(deep_model, tmp_path / "reference", monkeypatch))
    monkeypatch.setenv("SECATEUR_ARTIFACTS", str(tmp_path / "shared-store"))
    monkeypatch.setenv("SECATEUR_MIRROR_CHECKPOINTS", "true")
    _crash_after(5, deep_model, tmp_path / "machine-a", monkeypatch)

    resumed = _prune(deep_model, tmp_path / "machine-b", monkeypatch)  # nothing local: pulls the mirror
    assert resumed.resumed_from_block == 5
    _assert_identical(_weights(resumed), reference)
    assert not any((tmp_path / "shared-store" / "checkpoints").rglob("*.safetensors")), "cleared after success"


def test_stage_checkpoint_keeps_the_previous_state_until_the_new_one_is_in(tmp_path, monkeypatch, caplog):
    import os

    import torch

    from infra import stage_checkpoint
    from infra.stage_checkpoint import StageCheckpoint

    checkpoint = StageCheckpoint(tmp_path / "run" / "recovery", "run-a")
    checkpoint.write({"x": torch.ones(3)}, {"step": 1})
    real_replace = os.replace

    def crash_on_swap_in(src, dst):
        if str(src).endswith(".tmp-" + str(os.getpid())):
            raise OSError("killed while swapping in")
        real_replace(src, dst)

    monkeypatch.setattr(stage_checkpoint.os, "replace", crash_on_swap_in)
    with pytest.raises(OSError):
        checkpoint.write({"x": torch.zeros(3)}, {"step": 2})
    monkeypatch.setattr(stage_checkpoint.os, "replace", real_replace)
    tensors, meta = checkpoint.read()  # the state of step 1 survived
    assert meta == {"step": 1} and torch.equal(tensors["x"], torch.ones(3))
    assert StageCheckpoint(tmp_path / "run" / "recovery", "run-b").read() is None  # another run's: refused
    assert "is not this run's" in caplog.text


def test_a_resume_under_other_threads_is_allowed_logged_and_recorded(tmp_path, deep_model, monkeypatch, caplog):
    """Weights depend on the thread count; a resume with another one goes on, but says so in its report."""
    home = tmp_path / "home"
    threads = torch.get_num_threads()
    _crash_after(3, deep_model, home, monkeypatch)
    torch.set_num_threads(threads + 1)
    try:
        resumed = _prune(deep_model, home, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert resumed.resumed_from_block == 3
    assert resumed.environment["threads"] == str(threads + 1)
    assert resumed.resumed_environment["threads"] == str(threads)
    assert "were pruned with" in caplog.text
    report = json.loads((Path(resumed.path) / "sparsity.json").read_text())
    assert report["resumed_environment"]["threads"] == str(threads) and report["dtype"] == "float32"
