"""The trainer: who steps when (groups x phases), gradient isolation, warm-up, errors."""

from typing import Literal

import pytest
import torch
from torch import nn

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl
from fewstep.plugin import PluginInfo, build_manager, discover
from fewstep.testing import Recorder, make_tiny_teacher, run_tiny, tiny_run_config
from fewstep.trainer import Trainer, TrainingError
from fewstep.types import LossOutput, OptimizerGroup, Phase

B = 4


class DummyConfig(MethodConfig):
    name: Literal["dummy"] = "dummy"


class TwoGroupTwoPhase:
    """A GAN-shaped method: a generator group (the student) every 2nd step and a critic group every
    step; phase 'warmup' trains only the critic for 4 steps, phase 'main' trains both."""

    def __init__(self, warmup_steps: int = 4) -> None:
        self.warmup_steps = warmup_steps
        self.calls: list[tuple[int, str, str]] = []
        self.phase_ends: list[tuple[str, int]] = []
        self.requires_grad_seen: list[tuple[str, bool, bool]] = []

    @hookimpl
    def fewstep_method_config(self):
        return ("dummy", DummyConfig)

    @hookimpl
    def fewstep_extra_networks(self, student):
        return {"critic": nn.Sequential(nn.Flatten(), nn.Linear(64, 1))}

    @hookimpl
    def fewstep_optimizer_groups(self, ctx, nets):
        return [OptimizerGroup("gen", ("student",), lr=1e-3, every_n_steps=2),
                OptimizerGroup("critic", ("critic",), lr=1e-3, every_n_steps=1)]

    @hookimpl
    def fewstep_phases(self, ctx, groups):
        return [Phase("warmup", ("critic",), duration_nimg=self.warmup_steps * B), Phase("main", ("gen", "critic"))]

    @hookimpl
    def fewstep_loss(self, group, batch, nets, step):
        self.calls.append((step.step, step.phase, group.name))
        student_on = any(p.requires_grad for p in nets.student.parameters())
        critic_on = any(p.requires_grad for p in nets.get("critic").parameters())
        self.requires_grad_seen.append((group.name, student_on, critic_on))
        t = torch.full((batch.x0.shape[0],), 500.0)
        if group.name == "gen":  # the generator's loss goes through the critic, as a GAN's does
            fake = nets.student(batch.x0, t, batch.cond)
            return LossOutput(loss=-nets.get("critic")(fake).squeeze(1))
        with torch.no_grad():
            fake = nets.student(batch.x0, t, batch.cond)
        critic = nets.get("critic")
        return LossOutput(loss=(critic(fake) - critic(batch.x0)).squeeze(1))

    @hookimpl
    def fewstep_on_phase_end(self, phase, nets):
        self.phase_ends.append((phase.name, len(self.calls)))

    @hookimpl
    def fewstep_sample(self, noise):
        return noise


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), "unet")


def _run(teacher, tmp_path, plugin, steps=10, **sections):
    plugins = {**discover(), "dummy": PluginInfo("dummy", plugin, "test 0", methods={"dummy": DummyConfig})}
    from fewstep.config import validate_config
    from fewstep.plugin import method_registry

    base = tiny_run_config(teacher, {"name": "cd"}, steps=steps, batch=B, **sections).dump()
    base["method"] = {"name": "dummy"}
    config = validate_config(base, method_registry(plugins))
    pm = build_manager("dummy", plugins=plugins)
    rec = Recorder()
    pm.register(rec, name="recorder")
    trainer = Trainer(config, pm, tmp_path / "run")
    return trainer, rec


def test_who_steps_when(teacher, tmp_path):
    plugin = TwoGroupTwoPhase(warmup_steps=4)
    trainer, rec = _run(teacher, tmp_path, plugin)
    student0 = {k: v.clone() for k, v in trainer_state_after_setup(trainer).items()}
    trainer.fit()
    expected = []
    for step in range(10):
        phase = "warmup" if step < 4 else "main"
        if phase == "main" and step % 2 == 0:
            expected.append((step, phase, "gen"))
        expected.append((step, phase, "critic"))
    assert plugin.calls == expected
    assert plugin.phase_ends == [("warmup", 4), ("main", len(expected))]
    # gradients and requires_grad only on the due group, never on the teacher
    assert [g for g, _ in rec.grads] == [c[2] for c in expected]
    for group, has in rec.grads:
        assert has == {"student": group == "gen", "critic": group == "critic", "ema": False, "teacher": False}
    for group, student_on, critic_on in plugin.requires_grad_seen:
        assert (student_on, critic_on) == (group == "gen", group == "critic")
    # the student did not move during the warm-up phase, the EMA only follows the student group
    assert any(not torch.equal(v, trainer.nets.student.state_dict()[k]) for k, v in student0.items())


def trainer_state_after_setup(trainer):
    trainer.setup()
    trainer.setup = lambda: None  # fit() reuses the built run
    return trainer.nets.student.state_dict()


def test_student_frozen_during_critic_only_phase(teacher, tmp_path):
    plugin = TwoGroupTwoPhase(warmup_steps=6)
    trainer, _ = _run(teacher, tmp_path, plugin, steps=6)
    before = {k: v.clone() for k, v in trainer_state_after_setup(trainer).items()}
    critic_before = [p.clone() for p in trainer.nets.get("critic").parameters()]
    trainer.fit()
    for k, v in before.items():
        assert torch.equal(v, trainer.nets.student.state_dict()[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.nets.get("critic").parameters()))


def test_bad_schedules_are_rejected(teacher, tmp_path):
    class UnknownGroup(TwoGroupTwoPhase):
        @hookimpl
        def fewstep_phases(self, ctx, groups):
            return [Phase("p", ("gen", "dis"))]

    trainer, _ = _run(teacher, tmp_path, UnknownGroup())
    with pytest.raises(TrainingError, match="unknown optimizer group.*'dis'"):
        trainer.setup()

    class OpenEndedFirst(TwoGroupTwoPhase):
        @hookimpl
        def fewstep_phases(self, ctx, groups):
            return [Phase("a", ("gen",)), Phase("b", ("critic",))]

    trainer, _ = _run(teacher, tmp_path, OpenEndedFirst())
    with pytest.raises(TrainingError, match="only the last phase"):
        trainer.setup()


def test_batch_must_divide_accumulation(teacher, tmp_path):
    trainer, _ = _run(teacher, tmp_path, TwoGroupTwoPhase(), train={"accumulation": 3})
    with pytest.raises(TrainingError, match="not divisible"):
        trainer.setup()


def test_loss_of_wrong_shape_is_reported(teacher, tmp_path):
    class Scalar(TwoGroupTwoPhase):
        @hookimpl
        def fewstep_loss(self, batch, nets):
            return LossOutput(loss=batch.x0.mean())

    trainer, _ = _run(teacher, tmp_path, Scalar())
    with pytest.raises(TrainingError, match=r"expected per-sample losses of shape \(4,\)"):
        trainer.fit()


def test_accumulation_matches_the_full_batch(teacher, tmp_path):
    """Two accumulation rounds of 2 give the same update as one round of 4: same samples, same noise
    (draws follow the global sample index), mean over the batch. SGD, because Adam's first steps are
    ~lr * sign(g) and turn float rounding of near-zero gradients into visible differences."""
    from fewstep.testing import run_tiny

    sgd = {"optimizer": {"name": "sgd", "lr": 1e-4}}
    one, rec1 = run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 8}, steps=2, batch=B, **sgd),
                         tmp_path / "a")
    two, rec2 = run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 8}, steps=2, batch=B,
                                         train={"accumulation": 2}, **sgd), tmp_path / "b")
    assert [r["student/loss"] for r in rec1.logs] == pytest.approx([r["student/loss"] for r in rec2.logs], rel=1e-5)
    for k, v in one.nets.student.state_dict().items():
        torch.testing.assert_close(v, two.nets.student.state_dict()[k], rtol=1e-4, atol=1e-6)


def test_interrupt_writes_a_checkpoint(teacher, tmp_path):
    class Interrupt(TwoGroupTwoPhase):
        @hookimpl
        def fewstep_on_step_end(self, step):
            if step.step == 3:
                raise KeyboardInterrupt

    trainer, _ = _run(teacher, tmp_path, Interrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    from fewstep.builtin.checkpoint import checkpoint_dirs

    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-00000003"]


def test_clipping_bf16_and_warmup(teacher, tmp_path):
    from accelerate.state import AcceleratorState

    from fewstep.testing import run_tiny

    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 8}, steps=3, batch=B,
                             optimizer={"max_grad_norm": 1e-3, "warmup_nimg": 8 * B},
                             train={"mixed_precision": "bf16"})
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
    try:
        trainer, rec = run_tiny(config, tmp_path / "run")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert trainer.nets.teacher.dtype == torch.bfloat16
    assert next(trainer.nets.student.parameters()).dtype == torch.float32  # master weights stay fp32
    assert all(log["student/grad_norm"] > 0 for log in rec.logs)
    assert [round(log["student/lr"] / 1e-4, 6) for log in rec.logs] == [0.125, 0.25, 0.375]


def test_inverse_sqrt_decay_follows_the_warmup(teacher, tmp_path):
    """optimizer.decay_nimg: EDM2's lr / sqrt(max(nimg / decay_nimg, 1)) after the linear warm-up, read by the
    trainer at every step (the logged rate) and carried into every group built from the recipe."""
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 8}, steps=6, batch=B,
                             optimizer={"warmup_nimg": 2 * B, "decay_nimg": 3 * B})
    trainer, rec = run_tiny(config, tmp_path / "run")
    assert trainer.groups["student"].decay_nimg == 3 * B
    steps = range(1, 7)  # the step that ends at k batches reads the rate at k * B images
    expected = [1e-4 * min(1.0, k / 2) / max(k / 3, 1.0) ** 0.5 for k in steps]
    assert [log["student/lr"] for log in rec.logs] == pytest.approx(expected)
    assert expected[:3] == pytest.approx([0.5e-4, 1e-4, 1e-4]) and expected[5] == pytest.approx(1e-4 / 2 ** 0.5)


@pytest.mark.parametrize("method, recipe_groups", [
    ({"name": "dmd2"}, {"generator", "critic"}),
    ({"name": "scm"}, {"student"}),
    ({"name": "caf"}, {"velocity", "acceleration"}),
    ({"name": "ctm", "gan_start_nimg": 8}, {"student"}),
    ({"name": "pcm", "adv_weight": 0.1}, {"student"}),
])
def test_groups_built_from_the_recipe_carry_its_schedule(teacher, tmp_path, method, recipe_groups):
    """Every group that trains on the recipe's optimizer section gets its warm-up and decay; a GAN's own
    discriminator (its own rate in the method section) keeps a constant rate."""
    from fewstep.plugin import build_manager
    from fewstep.testing import tiny_pairs

    data = {"pairs": str(tiny_pairs(teacher))} if method["name"] == "caf" else {}
    config = tiny_run_config(teacher, method, optimizer={"warmup_nimg": 8, "decay_nimg": 16}, data=data)
    trainer = Trainer(config, build_manager(config.method.name), tmp_path / "run")
    trainer.setup()
    assert {n for n, g in trainer.groups.items() if g.decay_nimg == 16 and g.lr == 1e-4} == recipe_groups
    assert all(g.decay_nimg is None for n, g in trainer.groups.items() if n not in recipe_groups)


def test_lr_scale_is_a_function_of_where_training_stands(teacher, tmp_path):
    """OptimizerGroup.lr_scale: here progressive distillation's per-phase annealing 1 - phase_progress."""

    class Annealed(TwoGroupTwoPhase):
        @hookimpl
        def fewstep_optimizer_groups(self, ctx, nets):
            anneal = lambda s: 1.0 - s.phase_progress  # noqa: E731
            return [OptimizerGroup("gen", ("student",), lr=1e-3, lr_scale=anneal),
                    OptimizerGroup("critic", ("critic",), lr=1e-3)]

    trainer, rec = _run(teacher, tmp_path, Annealed(warmup_steps=4), steps=8)
    trainer.fit()
    lrs = [log["gen/lr"] for log in rec.logs if "gen/lr" in log]
    expected = [1e-3 * (1 - k / 4) for k in range(4)]  # the 'main' phase: 4 steps, progress 0, 1/4, ...
    assert lrs == pytest.approx(expected)
    assert all(log["critic/lr"] == 1e-3 for log in rec.logs)


def test_peak_memory_in_the_summary_is_the_training_peak(tmp_path, monkeypatch):
    """The summary's peak memory is read when training ends, before the final grid, evaluation and export
    (on CPU the process's peak RSS only grows, so a later reading would include the FID network)."""
    import json

    import fewstep.trainer as trainer_module

    after_training = []  # the final grid (validate) runs after training: readings from then on are 2.0
    validate = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda self: (validate(self), after_training.append(True))[0])
    monkeypatch.setattr(trainer_module, "peak_memory_mb", lambda device: 2.0 if after_training else 1.0)
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=2), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_mb"] == 1.0


def test_metrics_average_each_group_over_its_own_steps():
    """A group that steps every 2nd step (TTUR) logs its own mean, not half of it (issue 17's review)."""
    from types import SimpleNamespace

    from fewstep.builtin.logging import Window

    window = Window()
    for step in range(4):
        window.add({"fake/loss": 1.0, **({"gen/loss": 3.0, "gen/lr": 1e-4} if step % 2 else {})})
    ctx = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(log_every_nimg=16)), global_batch=4)
    assert not Window.closes(ctx, SimpleNamespace(nimg=12, total_nimg=100))
    assert Window.closes(ctx, SimpleNamespace(nimg=16, total_nimg=100))
    assert window.pop() == {"fake/loss": 1.0, "gen/loss": 3.0, "gen/lr": pytest.approx(1e-4)}
    assert window.pop() == {}
