"""Trackers through accelerate (fewstep.builtin.tracking): TensorBoard event files hold the logged scalars,
learning rates, gradient norms, the validation rows as images and the recipe as hyper-parameters; wandb in
offline mode writes a run with the same scalars; the plugin is switched off by name."""

import pytest

from fewstep.builtin.tracking import flat_hparams
from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), "unet")


def _config(teacher, tmp_path, **tracking):
    return tiny_run_config(teacher, {"name": "cd"}, steps=3, batch=4,
                           tracking={"log_with": ["tensorboard"], **tracking},
                           optimizer={"max_grad_norm": 1.0}, export={"enabled": False})


def test_flat_hparams():
    flat = flat_hparams({"train": {"batch_size": 4, "cpu": True, "max_wall_s": None}, "steps": [1, 2], "d": {}})
    assert flat == {"train.batch_size": 4, "train.cpu": True, "train.max_wall_s": "None", "steps": "[1, 2]",
                    "d": "{}"}


def test_tensorboard_scalars_images_and_hparams(teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, rec = run_tiny(_config(teacher, tmp_path), tmp_path / "run")
    folder = tmp_path / "run" / "trackers" / "run"
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"student/loss", "student/lr", "student/grad_norm", "images_per_s"} <= scalars
    losses = acc.Scalars("student/loss")
    assert [e.step for e in losses] == [4, 8, 12]  # one point per log interval, at images seen
    assert [e.value for e in losses] == pytest.approx([r["student/loss"] for r in rec.logs], rel=1e-5)
    assert {"validation/student 1 step", "validation/teacher 2 steps"} <= set(acc.Tags()["images"])
    first = acc.Images("validation/student 1 step")[0]  # the row's 4 images side by side
    assert first.step == 12 and first.height == 8 and first.width >= 4 * 8
    hparams = list(folder.glob("*/hparams.yml"))
    assert hparams and "train.batch_size: 4" in hparams[0].read_text()


def test_disabled_by_name(teacher, tmp_path):
    config = _config(teacher, tmp_path).model_copy(update={})
    config.plugins.disable.append("tracking")
    run_tiny(config, tmp_path / "run")
    assert not (tmp_path / "run" / "trackers").exists()


def test_wandb_offline(teacher, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(teacher, tmp_path, log_with=["wandb"], init_kwargs={"wandb": {"dir": str(tmp_path)}})
    run_tiny(config, tmp_path / "run")
    wandb.teardown()  # the wandb-core service writes the run file in the background; wait for it to finish
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = list(runs[0].glob("run-*.wandb"))[0].read_bytes()  # protobuf records; keys are stored as text
    assert b"student/loss" in log and b"student/grad_norm" in log and b"train.batch_size" in log
    assert list((runs[0] / "files" / "media" / "images" / "validation").glob("student 1 step_12_*.png"))
