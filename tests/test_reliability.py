"""Reliability (docs/RELIABILITY.md): stop requests checkpoint at a step boundary and resume bit-exactly,
non-finite values never reach a checkpoint, one run per folder, resume config checks, the user cache, and
the CLI's one-message errors. In-process and small: a tiny teacher, a few CPU steps."""

import errno
import json
import os
import signal
from typing import Literal

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fewstep import cli
from fewstep.builtin.checkpoint import checkpoint_dirs
from fewstep.config import ConfigError, MethodConfig, load_run_config, validate_config
from fewstep.hookspecs import hookimpl
from fewstep.plugin import PluginInfo, build_manager, discover, method_registry
from fewstep.reliability import (
    EXIT_ABORTED,
    EXIT_DIVERGED,
    EXIT_RESUMABLE,
    NonFiniteError,
    RunLock,
    RunLockError,
    RunStopped,
    StopSignals,
    check_resume_config,
    config_changes,
    current_config,
    length_change_note,
)
from fewstep.testing import Recorder, make_tiny_teacher, run_tiny, tiny_run_config
from fewstep.trainer import Trainer, TrainingError
from fewstep.types import LossOutput

B = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), "unet")


def cd_config(teacher, steps=5, **sections):
    return tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=steps, batch=B,
                           export={"enabled": False}, **sections)


class SignalAt:
    """Sends this process a signal at the end of step ``at`` (as a cluster's scheduler would, mid-run)."""

    def __init__(self, at: int, sig: int = signal.SIGTERM) -> None:
        self.at, self.sig = at, sig

    @hookimpl
    def fewstep_on_step_end(self, step):
        if step.step == self.at:
            os.kill(os.getpid(), self.sig)


def build(config, run_dir, *extra, resume=False):
    pm = build_manager(config.method.name)
    rec = Recorder()
    pm.register(rec, name="recorder")
    for i, plugin in enumerate(extra):
        pm.register(plugin, name=f"extra{i}")
    return Trainer(config, pm, run_dir, resume=resume), rec


def student(trainer):
    return {k: v.clone() for k, v in trainer.nets.student.state_dict().items()}


# ------------------------------------------------------------------------------------------ stop requests
@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory):
    return run_tiny(cd_config(teacher), tmp_path_factory.mktemp("full") / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGUSR1: the same handler (next test)
def test_stop_signal_checkpoints_and_resume_is_bit_exact(teacher, tmp_path, sig, uninterrupted):
    full, rec_full = uninterrupted
    trainer, _ = build(cd_config(teacher), tmp_path / "run", SignalAt(2, sig))
    with pytest.raises(RunStopped) as stopped:
        trainer.fit()
    assert stopped.value.reason == signal.Signals(sig).name and stopped.value.nimg == 2 * B
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run
    resumed, rec = run_tiny(cd_config(teacher), tmp_path / "run", resume=True)
    assert rec.logs == rec_full.logs[2:]
    for k, v in student(full).items():
        assert torch.equal(v, resumed.nets.student.state_dict()[k]), k


def test_sigusr1_requests_a_stop():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == "SIGUSR1"


def test_second_ctrl_c_aborts_at_once():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


class CtrlCTwice:
    @hookimpl
    def fewstep_on_step_end(self, step):
        if step.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a stop request...
            os.kill(os.getpid(), signal.SIGINT)  # ...and an impatient second press before it is acted on


def test_second_ctrl_c_in_a_run_aborts_without_a_checkpoint(teacher, tmp_path):
    trainer, _ = build(cd_config(teacher), tmp_path / "run", CtrlCTwice())
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert checkpoint_dirs(tmp_path / "run") == []


def test_wall_time_budget_stops_cleanly(teacher, tmp_path):
    trainer, _ = build(cd_config(teacher, train={"max_wall_s": 1e-6}), tmp_path / "run")
    with pytest.raises(RunStopped, match="train.max_wall_s"):
        trainer.fit()
    assert trainer.state.nimg == B and [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000001"]


def test_time_based_checkpoints(teacher, tmp_path):
    run_tiny(cd_config(teacher, steps=3, train={"checkpoint_every_s": 1e-6, "keep_checkpoints": 10}), tmp_path / "r")
    assert [p.name for p in checkpoint_dirs(tmp_path / "r")] == ["step-00000001", "step-00000002", "step-00000003"]


def test_default_checkpoint_interval_is_30_minutes(teacher):
    assert cd_config(teacher).train.checkpoint_every_s == 1800.0


# ------------------------------------------------------------------------------------------ non-finite
class NanConfig(MethodConfig):
    name: Literal["nanny"] = "nanny"


class NanAt:
    """A method whose loss is a finite regression except at the steps in ``bad`` (NaN)."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    @hookimpl
    def fewstep_method_config(self):
        return ("nanny", NanConfig)

    @hookimpl
    def fewstep_loss(self, batch, nets, step):
        t = torch.full((batch.x0.shape[0],), 500.0)
        loss = (nets.student(batch.x0, t, batch.cond) - batch.x0).pow(2).flatten(1).mean(1)
        return LossOutput(loss=loss * float("nan") if step.step in self.bad else loss)

    @hookimpl
    def fewstep_sample(self, noise):
        return noise


def nan_trainer(teacher, run_dir, bad, **train):
    plugins = {**discover(), "nanny": PluginInfo("nanny", NanAt(bad), "test 0", methods={"nanny": NanConfig})}
    data = cd_config(teacher, train={"checkpoint_every_nimg": B, "keep_checkpoints": 10, **train}).dump()
    data["method"] = {"name": "nanny"}
    config = validate_config(data, method_registry(plugins))
    return Trainer(config, build_manager("nanny", plugins=plugins), run_dir)


def test_nonfinite_loss_stops_and_keeps_the_finite_checkpoints(teacher, tmp_path):
    trainer = nan_trainer(teacher, tmp_path / "run", {3})
    with pytest.raises(NonFiniteError, match=r"step 3 .*loss=nan.*no checkpoint written"):
        trainer.fit()
    kept = checkpoint_dirs(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000001", "step-00000002", "step-00000003"]
    weights = load_file(kept[-1] / "nets" / "student.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_skip_policy(teacher, tmp_path):
    trainer = nan_trainer(teacher, tmp_path / "run", {1, 4}, nonfinite="skip", max_nonfinite_skips=2)
    trainer.fit()
    assert trainer.state.skipped == 2
    assert json.loads((checkpoint_dirs(tmp_path / "run")[-1] / "trainer_state.json").read_text())["skipped"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.nets.student.parameters())
    over = nan_trainer(teacher, tmp_path / "over", {1, 2}, nonfinite="skip", max_nonfinite_skips=1)
    with pytest.raises(NonFiniteError, match="max_nonfinite_skips=1"):
        over.fit()


def test_diverging_learning_rate_is_caught(teacher, tmp_path):
    config = cd_config(teacher, optimizer={"name": "sgd", "lr": 1e30},
                       train={"checkpoint_every_nimg": B, "keep_checkpoints": 10})
    with pytest.raises(NonFiniteError, match="lower optimizer.lr"):
        run_tiny(config, tmp_path / "run")
    for path in checkpoint_dirs(tmp_path / "run"):
        assert all(torch.isfinite(v).all() for v in load_file(path / "nets" / "student.safetensors").values())


def test_checkpoint_with_nonfinite_weights_is_refused(teacher, tmp_path):
    trainer, _ = run_tiny(cd_config(teacher, steps=2), tmp_path / "run")
    before = checkpoint_dirs(tmp_path / "run")
    with torch.no_grad():
        next(trainer.nets.student.parameters()).view(-1)[0] = float("inf")
    trainer.state.step += 1
    with pytest.raises(NonFiniteError, match=r"NaN or inf \(student\..*are kept"):
        trainer.save_checkpoint()
    assert checkpoint_dirs(tmp_path / "run") == before


def test_teacher_with_a_nan_weight_is_refused(teacher, tmp_path):
    import shutil

    bad = tmp_path / "bad-teacher"
    shutil.copytree(teacher, bad)
    weights = next(bad.rglob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights)
    trainer, _ = build(cd_config(bad), tmp_path / "run")
    with pytest.raises(TrainingError, match=r"teacher .*NaN or inf.*point teacher.pretrained at a finite"):
        trainer.setup()


# ------------------------------------------------------------------------------------------ lock
def test_second_run_on_a_folder_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockError, match=rf"in use by pid {os.getpid()} on host .*another --run-dir"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path) as again:  # released cleanly: no stale owner
        assert again.stale_owner == {}


def test_stale_lock_is_taken_over(tmp_path):
    (tmp_path / RunLock.NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    with RunLock(tmp_path) as lock:
        assert lock.stale_owner["pid"] == 999999
        assert json.loads((tmp_path / RunLock.NAME).read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------------------------------ resume checks
def test_resume_config_changes(tmp_path):
    old = {"train": {"batch_size": 32, "log_every_nimg": 100}, "optimizer": {"lr": 1e-4}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    new = {"train": {"batch_size": 16, "log_every_nimg": 50}, "optimizer": {"lr": 1e-4}}
    with pytest.raises(ConfigError, match=r"train.batch_size: 32 -> 16[\s\S]*--allow-config-change"):
        check_resume_config(tmp_path, new, allow_change=False, checkpoint="step-1")
    assert not (tmp_path / "config-changes.jsonl").exists()
    changes = check_resume_config(tmp_path, new, allow_change=True, checkpoint="step-1")
    assert {c["field"]: c["replay_safe"] for c in changes} == {"train.batch_size": False, "train.log_every_nimg": True}
    safe_only = {"train": {"batch_size": 32, "log_every_nimg": 50}, "optimizer": {"lr": 1e-4}}
    check_resume_config(tmp_path, safe_only, allow_change=False, checkpoint="step-2")
    lines = [json.loads(line) for line in (tmp_path / "config-changes.jsonl").read_text().splitlines()]
    assert [line["resumed_from"] for line in lines] == ["step-1", "step-2"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == old  # never rewritten
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == [
        {"field": "a.c", "old": "(absent)", "new": 2, "replay_safe": False}]


def test_a_new_length_names_what_the_method_reads_of_it(tmp_path):
    """Resuming with a new train.total_nimg: the refusal (and, accepted, the CLI's note) says what of the method
    follows the run's length; methods that read nothing of it, or another change, get no sentence."""
    from fewstep_plugins.caf_config import CAFConfig
    from fewstep_plugins.cm_config import CDConfig, CTConfig, ICTConfig
    from fewstep_plugins.ect_config import ECTConfig, SCTConfig
    from fewstep_plugins.msd_config import MSDConfig
    from fewstep_plugins.tcm_config import TCMConfig

    old = {"method": {"name": "ct"}, "train": {"total_nimg": 100}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    new = {"method": {"name": "ct"}, "train": {"total_nimg": 200}}
    use = CTConfig().run_length_use()
    with pytest.raises(ConfigError, match=r"total_nimg 100 -> 200: method ct reads the run's length \(its "
                       r"discretisation curriculum[\s\S]*--allow-config-change"):
        check_resume_config(tmp_path, new, allow_change=False, checkpoint="step-1", length_use=use)
    changes = check_resume_config(tmp_path, new, allow_change=True, checkpoint="step-1", length_use=use)
    assert "not the run a fresh start with the new length makes" in length_change_note(changes, new, use)
    assert length_change_note(changes, new, None) is None
    assert length_change_note(config_changes(old, {**old, "optimizer": {"lr": 1}}), old, use) is None
    assert CDConfig().run_length_use() is None and ICTConfig().run_length_use() is not None
    assert ECTConfig().run_length_use() is None and SCTConfig().run_length_use() is None
    assert "0.5" in SCTConfig(guidance_snapshot=0.5, guidance=2.0).run_length_use()
    assert "stage1_fraction=0.5" in TCMConfig().run_length_use()
    assert MSDConfig(gan_generator_weight=0, gan_critic_weight=0).run_length_use() is None
    assert "adm_nimg=20000" in MSDConfig().run_length_use()
    assert "half" in CAFConfig().run_length_use() and CAFConfig(velocity_nimg=10).run_length_use() is None
    assert "gan_nimg=5" in CAFConfig(velocity_nimg=10, gan_nimg=5).run_length_use()


def test_current_config_is_the_original_with_the_last_resumes_changes(tmp_path):
    """eval / sample / export / compare read the run as its last resume left it: each line of config-changes.jsonl
    holds every difference from config.yaml, so the last line alone applies; a resume back to the original writes
    an empty line; integer keys (a step count's) stay integers; a scalar may become a section and back."""
    old = {"method": {"name": "flowmap", "sample_guidance": 1.5, "sample_times": {1: [0.9, 0.0]}},
           "train": {"total_nimg": 100, "seed": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert current_config(tmp_path, old) == old  # never resumed
    new = {"method": {"name": "flowmap", "sample_guidance": {1: 2.5, 4: 1.5}, "sample_times": {1: [0.95, 0.0]}},
           "train": {"total_nimg": 200, "seed": 0}}
    check_resume_config(tmp_path, new, allow_change=True, checkpoint="step-1")
    assert current_config(tmp_path, old) == new
    back = {"method": {"name": "flowmap", "sample_guidance": 2.0, "sample_times": {}}, "train": {"total_nimg": 300}}
    check_resume_config(tmp_path, back, allow_change=True, checkpoint="step-2")
    assert current_config(tmp_path, old) == back  # the section back to a scalar, the seed removed
    check_resume_config(tmp_path, old, allow_change=False, checkpoint="step-3")
    assert json.loads((tmp_path / "config-changes.jsonl").read_text().splitlines()[-1])["changes"] == []
    assert current_config(tmp_path, old) == old
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == old
    (tmp_path / "config-changes.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="config-changes.jsonl: the last line"):
        current_config(tmp_path, old)


def test_a_runs_config_is_a_valid_recipe_for_a_class_conditional_teacher(in_repo, tmp_path, capsys):
    """config.yaml holds every field; data.class_conditional defaults to None (follow the teacher), so the written
    config passes the check that refuses an explicit false with a class-conditional teacher."""
    from fewstep.config import load_config, write_resolved

    config = load_config("recipes/digits/guided.yaml")
    assert config.data.class_conditional is None
    written = write_resolved(config, tmp_path / "run")
    assert yaml.safe_load(written.read_text())["data"]["class_conditional"] is None
    assert cli.main(["validate", str(written)]) == 0
    assert cli.main(["validate", str(written), "--set", "data.class_conditional=false"]) == 2
    assert "remove data.class_conditional" in capsys.readouterr().err
    # configs written before the default was None saved false for the same run: not a change on resume
    assert config_changes({"data": {"class_conditional": False}}, {"data": {"class_conditional": None}}) == []
    assert config_changes({"data": {"class_conditional": True}}, {"data": {"class_conditional": None}}) != []


def digits_args(run, *more):
    return ["distill", "recipes/digits/cd.yaml", "--run-dir", str(run), "--set", "train.total_nimg=32",
            "--set", "train.batch_size=16", "--set", "train.progress_bar=false", "--set", "validation.teacher_steps=2",
            "--set", "validation.num_images=4", "--set", "export.enabled=false", "--set", "data.limit=64", *more]


@pytest.fixture
def in_repo(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])


def test_cli_resume_rules(in_repo, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-00000001" / "nets").mkdir(parents=True)  # a kill during the first write
    assert cli.main(digits_args(run)) == 0  # an incomplete first checkpoint does not block a fresh start
    original = (run / "config.yaml").read_text()
    assert cli.main(digits_args(run, "--set", "train.batch_size=8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 16 -> 8" in err and "--allow-config-change" in err and "Traceback" not in err
    from fewstep_plugins.cm_config import CDConfig

    monkeypatch.setattr(CDConfig, "run_length_use", lambda self: "a curriculum of this test")
    capsys.readouterr()
    assert cli.main(digits_args(run, "--set", "train.total_nimg=48", "--resume", "--allow-config-change")) == 0
    assert "note: train.total_nimg 32 -> 48: method cd reads the run's length (a curriculum of this test)" in \
        capsys.readouterr().err
    assert (run / "config.yaml").read_text() == original
    assert load_run_config(run).train.total_nimg == 48  # what eval, sample and export rebuild
    change = json.loads((run / "config-changes.jsonl").read_text())
    assert change["changes"][0]["field"] == "train.total_nimg" and change["resumed_from"] == "step-00000002"
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / ".tmp-step-00000001").mkdir(parents=True)
    (fresh / "config.yaml").write_text(original)
    assert cli.main(digits_args(fresh, "--resume")) == 0  # --resume without a complete checkpoint: from the start
    assert "starting from the beginning" in capsys.readouterr().err


def test_disk_full_while_checkpointing(in_repo, tmp_path, capsys, monkeypatch):
    import fewstep.builtin.checkpoint as checkpoint

    def full(model, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_model", full)
    run = tmp_path / "run"
    assert cli.main(digits_args(run)) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "student.safetensors" in err and "Traceback" not in err
    assert checkpoint_dirs(run) == []  # the half-written checkpoint is hidden; once space is free:
    monkeypatch.undo()
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    assert cli.main(digits_args(run, "--resume")) == 0


def test_cli_exit_codes_for_stops(in_repo, tmp_path, capsys, monkeypatch):
    def stop(self):
        raise RunStopped("SIGTERM", 16, tmp_path / "ck")

    monkeypatch.setattr(Trainer, "fit", stop)
    assert cli.main(digits_args(tmp_path / "a")) == EXIT_RESUMABLE
    assert "--resume" in capsys.readouterr().err

    def diverge(self):
        raise NonFiniteError("non-finite values")

    monkeypatch.setattr(Trainer, "fit", diverge)
    assert cli.main(digits_args(tmp_path / "b")) == EXIT_DIVERGED

    def abort(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", abort)
    assert cli.main(digits_args(tmp_path / "c")) == EXIT_ABORTED
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        cli.main([*digits_args(tmp_path / "d"), "--debug"])


# ------------------------------------------------------------------------------------------ errors, caches
@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x"), "no space left on the device (/runs/x); free"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "permission denied (/runs/x); check"),
    (FileNotFoundError(errno.ENOENT, "No such file", "/data/a.png"), "/data/a.png"),
    (TrainingError("fewstep_loss returned shape"), "fewstep_loss returned shape"),
])
def test_expected_errors_have_one_message(exc, expected):
    assert expected in cli.describe_error(exc)


def test_bugs_keep_their_traceback():
    assert cli.describe_error(RuntimeError("a bug")) is None and cli.describe_error(KeyError("x")) is None


def test_corrupt_files_have_one_message(tmp_path):
    from PIL import Image
    from safetensors import safe_open

    (tmp_path / "a.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(Exception) as caught:
        safe_open(str(tmp_path / "a.safetensors"), "pt")
    assert "truncated or corrupt: replace it" in cli.describe_error(caught.value)
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(Exception) as caught:
        Image.open(tmp_path / "b.png")
    assert "remove or replace that file" in cli.describe_error(caught.value)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    from fewstep.paths import cache_dir

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FEWSTEP_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "fewstep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "fewstep"


def test_evaluation_cache_is_not_next_to_the_data(monkeypatch, tmp_path):
    from fewstep.evaluation import eval_cache_dir

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "c"))
    assert eval_cache_dir() == tmp_path / "c" / "eval"


# ------------------------------------------------------------------------------------------ 2 processes
class SignalOnRank(SignalAt):
    def __init__(self, rank: int, at: int) -> None:
        super().__init__(at)
        self.rank = rank

    @hookimpl
    def fewstep_on_step_end(self, step):
        if step.rank == self.rank and step.step == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_log_the_global_mean_and_stop_together(teacher, tmp_path):
    """The logged loss is the mean over both ranks (equal to one process on the same global batch), and a
    SIGTERM that reaches rank 1 only stops both ranks after the same step (no rank waits forever)."""
    from accelerate import debug_launcher

    config = cd_config(teacher, steps=5, train={"log_every_nimg": B})
    run_tiny(config, tmp_path / "one")

    def worker() -> None:
        torch.set_num_threads(1)
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True)
        pm = build_manager(config.method.name)
        pm.register(SignalOnRank(1, at=2), name="signal")
        try:
            Trainer(config, pm, tmp_path / "two", accelerator=acc).fit()
            stopped = None
        except RunStopped as exc:
            stopped = exc.nimg
        (tmp_path / f"rank{acc.process_index}.json").write_text(json.dumps(stopped))

    debug_launcher(worker, num_processes=2)
    stops = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert stops == [2 * B, 2 * B]  # the flags are agreed after every step (Trainer.agreed_flags)
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [line["nimg"] for line in two] == [B, 2 * B]
    for a, b in zip(one, two):
        assert b["student/loss"] == pytest.approx(a["student/loss"], rel=1e-4)
