"""Fault injection (docs/RELIABILITY.md): damaged checkpoints (in-process, fast), and, slow-marked because
each starts `fewstep distill` processes, kill -9 at random moments and in the middle of a checkpoint write,
SIGTERM, two runs on one folder, and a diverging learning rate. Every interrupted run is resumed to the end
and must finish with weights bit-identical to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.builtin.checkpoint import CheckpointError, checkpoint_dirs
from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

ROOT = Path(__file__).parents[1]
B = 4


# ------------------------------------------------------------------------------------------ damaged checkpoints
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("damage")
    teacher = make_tiny_teacher(base / "teacher", "unet")
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=3, batch=B, export={"enabled": False},
                             train={"checkpoint_every_nimg": B, "keep_checkpoints": 3})
    full, _ = run_tiny(config, base / "full")
    return config, base / "full", {k: v.clone() for k, v in full.nets.student.state_dict().items()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated-weights": lambda ck: _truncate(ck / "nets" / "student.safetensors"),
    "missing-weights": lambda ck: (ck / "nets" / "student.safetensors").unlink(),
    "garbage-weights": lambda ck: (ck / "nets" / "student.safetensors").write_bytes(os.urandom(256)),
    "truncated-optimizer": lambda ck: _truncate(next((ck / "accelerate").glob("optimizer*.bin"))),
    "corrupt-state": lambda ck: (ck / "trainer_state.json").write_text("{\"step\": 2, "),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_names_the_previous_one(finished, tmp_path, damage):
    import shutil

    config, full, final = finished
    run = tmp_path / "run"
    shutil.copytree(full, run)
    latest = checkpoint_dirs(run)[-1]
    shutil.rmtree(latest)  # the run is now at step 2 of 3, with a damaged step 2 and a good step 1
    latest = checkpoint_dirs(run)[-1]
    DAMAGE[damage](latest)
    with pytest.raises(CheckpointError, match=rf"{latest.name} cannot be read.*delete .* previous checkpoint "
                                              rf"step-00000001"):
        run_tiny(config, run, resume=True)
    shutil.rmtree(latest)  # the fix the message gives
    resumed, _ = run_tiny(config, run, resume=True)
    for k, v in final.items():
        assert torch.equal(v, resumed.nets.student.state_dict()[k]), k


# ------------------------------------------------------------------------------------------ processes
STEPS, BATCH = 10, 16
ARGS = ["recipes/digits/cd.yaml", "--set", f"train.total_nimg={STEPS * BATCH}", "--set", f"train.batch_size={BATCH}",
        "--set", f"train.checkpoint_every_nimg={BATCH}", "--set", "train.keep_checkpoints=3",
        "--set", "train.progress_bar=false", "--set", f"train.log_every_nimg={BATCH}",
        "--set", "validation.teacher_steps=2", "--set", "validation.num_images=4", "--set", "validation.every_nimg=null",
        "--set", "export.enabled=false", "--set", "data.limit=128"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

KILL_ON_SAVE = """
import os, sys
import fewstep.builtin.checkpoint as checkpoint
calls, save = [0], checkpoint.save_model
def killing_save(*args, **kwargs):
    calls[0] += 1
    save(*args, **kwargs)
    if calls[0] == int(os.environ["KILL_AT_SAVE"]):
        os.kill(os.getpid(), 9)  # after a network file, before the folder is renamed into place
checkpoint.save_model = killing_save
from fewstep.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(run: Path, *more: str, kill_at_save: int | None = None, **kw) -> subprocess.Popen:
    head = [sys.executable, "-c", KILL_ON_SAVE] if kill_at_save else [sys.executable, "-m", "fewstep.cli"]
    env = {**ENV, "FEWSTEP_CACHE": str(run.parent / "cache"), "KILL_AT_SAVE": str(kill_at_save or 0)}
    return subprocess.Popen([*head, "distill", *ARGS, "--run-dir", str(run), *more], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(run: Path) -> subprocess.CompletedProcess:
    """Resume ``run`` until it completes (as a requeued cluster job would)."""
    proc = start(run, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return proc


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = checkpoint_dirs(run)[-1]
    assert last.name == f"step-{STEPS:08d}"
    return {f"{f.stem}.{k}": v for f in sorted((last / "nets").glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = start(run)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return final_weights(run)


def assert_same(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(weights[k], v), k


@pytest.mark.slow
def test_kill9_at_random_moments_loses_nothing(reference, tmp_path):
    rng = random.Random(11)
    for i in range(3):
        run = tmp_path / f"run{i}"
        proc = start(run)
        time.sleep(rng.uniform(3.0, 9.0))  # from during the imports to late in training
        proc.kill()
        proc.communicate()
        finish(run)
        assert_same(final_weights(run), reference)


@pytest.mark.slow
@pytest.mark.parametrize("save_call", [1, 5])  # the first checkpoint's first file; a later checkpoint
def test_kill9_mid_checkpoint_write(reference, tmp_path, save_call):
    run = tmp_path / "run"
    proc = start(run, kill_at_save=save_call)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint is there, never picked up
    finish(run)
    assert_same(final_weights(run), reference)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75(reference, tmp_path):
    run = tmp_path / "run"
    proc = start(run)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert checkpoint_dirs(run)[-1].name != f"step-{STEPS:08d}"
    finish(run)
    assert_same(final_weights(run), reference)


@pytest.mark.slow
def test_two_runs_on_one_folder(tmp_path):
    run = tmp_path / "run"
    procs = [start(run), start(run)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by pid" in loser and "another --run-dir" in loser


@pytest.mark.slow
def test_diverging_run_exits_3_and_keeps_finite_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "--set", "optimizer.name=sgd", "--set", "optimizer.lr=1e30")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert "non-finite" in err and "Traceback" not in err
    for path in checkpoint_dirs(run):
        for f in (path / "nets").glob("*.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(f).values()), f
