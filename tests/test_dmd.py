"""dmd plugin (``dmd``, ``dmd2``): conformance on the three backbones (DMD with a pair store made for each tiny
teacher), the TTUR schedule as group data, a teacher no gradient reaches, the GAN term through the frozen
critic, and configuration errors. The maths is checked against closed forms in test_distribution.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_pairs, tiny_run_config


class TestDMDConformance(MethodConformance):
    method = {"name": "dmd"}
    steps = 3

    def config(self, teacher, **sections):
        sections["data"] = {**sections.get("data", {}), "pairs": str(tiny_pairs(teacher))}
        return super().config(teacher, **sections)


class TestDMD2Conformance(MethodConformance):
    method = {"name": "dmd2", "ratio": 2}
    steps = 3


class TestDMD2MultistepConformance(MethodConformance):
    """Four generator steps with backward simulation and a GAN head per feature level of the fake score;
    validation samples with 1 and 2 steps."""

    method = {"name": "dmd2", "ratio": 2, "num_steps": 4, "gan_heads": "levels"}
    steps = 3


class TestDMD2EDMConformance(MethodConformance):
    method = {"name": "dmd2", "ratio": 2, "num_steps": 2}
    steps = 3
    backbones = ("unet",)
    teacher_options = {"process": "edm"}


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("dmd") / "class", "unet", conditioning="class")


def test_critic_steps_ratio_times_per_generator_step(class_teacher, tmp_path):
    trainer, rec = run_tiny(tiny_run_config(class_teacher, {"name": "dmd2", "ratio": 3}, steps=7), tmp_path / "r")
    order = [name for name, _ in rec.grads]
    assert order == ["generator", "critic", "critic", "critic", "generator", "critic", "critic", "critic",
                     "generator", "critic"]
    assert trainer.groups["generator"].every_n_steps == 3 and trainer.groups["critic"].every_n_steps == 1


def test_no_gradient_reaches_the_teacher_and_the_critic_stays_out_of_the_generator_step(class_teacher, tmp_path):
    before = {k: v.clone() for k, v in load_teacher(class_teacher).net.state_dict().items()}
    trainer, rec = run_tiny(tiny_run_config(class_teacher, {"name": "dmd2", "ratio": 1, "real_guidance": 2.0},
                                            steps=3), tmp_path / "r")
    teacher = trainer.nets.teacher.net
    assert not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    for group, has in rec.grads:
        assert not has["teacher"]
        if group == "generator":
            assert has["student"] and not has["fake_score"] and not has["gan_head"]


def test_gan_term_reaches_the_generator_through_the_frozen_critic(class_teacher, tmp_path):
    """With lambda_G the generator's gradient changes; the critic's parameters still receive none."""
    from fewstep.nn import requires_grad
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    grads = {}
    for weight in (0.0, 1.0):
        method = {"name": "dmd2", "gan_generator_weight": weight, "gan_critic_weight": 1e-2 if weight else 0.0}
        trainer = Trainer(tiny_run_config(class_teacher, method, steps=1), build_manager("dmd2"), tmp_path / f"{weight}")
        trainer.setup()
        group = trainer.groups["generator"]
        critic = [trainer.nets.get(n) for n in trainer.groups["critic"].modules]
        with requires_grad(critic, False):  # as the trainer freezes them in the generator turn
            out = trainer.pm.hook.fewstep_loss(ctx=trainer.ctx, group=group, batch=trainer.batch(0),
                                               nets=trainer.nets, step=trainer.step_info(0, group))
            out.loss.mean().backward()
        assert all(p.grad is None for m in critic for p in m.parameters())
        grads[weight] = trainer.nets.student.model.conv_out.weight.grad.clone()
        assert ("gan" in out.terms) == (weight > 0)
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_level_heads_judge_every_level_of_the_fake_score(class_teacher, tmp_path):
    """``gan_heads: levels``: one head per feature level of the fake score (mid and up blocks); the critic turn's
    discriminator term is the heads' losses averaged and trains every head; with ``gan_head_grid: 2`` each head
    gives 4 patch logits; f-distill, which reads one logit as its density ratio, refuses both before any work."""
    from fewstep.config import ConfigError
    from fewstep.distribution import bottleneck_critic
    from fewstep.gan import LevelHeads, discriminator_loss
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer
    from fewstep.types import Cond

    method = {"name": "dmd2", "gan_heads": "levels", "ratio": 1}
    trainer = Trainer(tiny_run_config(class_teacher, method, steps=1), build_manager("dmd2"), tmp_path / "r")
    trainer.setup()
    fake, head = trainer.nets.extra["fake_score"], trainer.nets.extra["gan_head"]
    assert isinstance(head, LevelHeads) and len(head.heads) == len(fake.feature_modules()) == 1 + len(fake.model.up_blocks)
    x, sigma = torch.randn(4, *trainer.nets.teacher.sample_shape), torch.full((4,), 0.5)
    logits = bottleneck_critic(trainer.nets.teacher.process, fake, head, Cond(labels=torch.tensor([0, 1, 2, 3])))(x, sigma)
    assert logits.shape == (4, len(head.heads))
    per_head = [discriminator_loss(logits[:, i], -logits[:, i]) for i in range(len(head.heads))]
    torch.testing.assert_close(discriminator_loss(logits, -logits), torch.stack(per_head, -1).mean(-1))
    group = trainer.groups["critic"]
    out = trainer.pm.hook.fewstep_loss(ctx=trainer.ctx, group=group, batch=trainer.batch(0), nets=trainer.nets,
                                       step=trainer.step_info(0, group))
    out.loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for h in head.heads for p in h.net[-1].parameters())
    with pytest.raises(ConfigError, match="density ratio"):
        tiny_run_config(class_teacher, {"name": "fdistill", "gan_heads": "levels"})
    with pytest.raises(ConfigError, match="density ratio"):
        tiny_run_config(class_teacher, {"name": "fdistill", "gan_head_grid": 2})
    patches = Trainer(tiny_run_config(class_teacher, {**method, "gan_head_grid": 2}, steps=1), build_manager("dmd2"),
                      tmp_path / "p")
    patches.setup()
    head = patches.nets.extra["gan_head"]
    critic = bottleneck_critic(patches.nets.teacher.process, patches.nets.extra["fake_score"], head,
                               Cond(labels=torch.tensor([0, 1, 2, 3])))
    assert critic(x, sigma).shape == (4, 4 * len(head.heads))


def test_dmd_needs_a_pair_store_and_one_step(class_teacher, tmp_path):
    from fewstep.config import ConfigError

    with pytest.raises(ValueError, match="fewstep pairs"):
        run_tiny(tiny_run_config(class_teacher, {"name": "dmd"}, steps=1), tmp_path / "a")
    with pytest.raises(ConfigError, match="dmd2"):
        tiny_run_config(class_teacher, {"name": "dmd", "num_steps": 4})
    with pytest.raises(ConfigError, match="both"):
        tiny_run_config(class_teacher, {"name": "dmd2", "gan_critic_weight": 0.0})
    trainer, rec = run_tiny(tiny_run_config(class_teacher, {"name": "dmd", "regression_weight": 0.0}, steps=2),
                            tmp_path / "b")
    assert "generator/regression" not in rec.logs[0]


def test_per_level_fake_scores_train_and_judge_only_their_level(class_teacher, tmp_path):
    """``fake_score_per_level``: one fake score and head per generator level; every critic turn trains every
    level's pair, each on its share of the batch (the samples simulated to that level), the generator turn
    reads its level's fake score and trains none; a one-step generator and a batch smaller than the number of
    levels are refused."""
    from fewstep_plugins.dmd import players

    from fewstep.config import ConfigError

    with pytest.raises(ConfigError, match="num_steps > 1"):
        tiny_run_config(class_teacher, {"name": "dmd2", "fake_score_per_level": True})
    method = {"name": "dmd2", "ratio": 1, "num_steps": 3, "fake_score_per_level": True}
    with pytest.raises(ValueError, match="a micro-batch holds 2 samples"):
        run_tiny(tiny_run_config(class_teacher, method, batch=2), tmp_path / "small")
    trainer, rec = run_tiny(tiny_run_config(class_teacher, method, steps=8), tmp_path / "r")
    pairs = [("fake_score", "gan_head"), ("fake_score_1", "gan_head_1"), ("fake_score_2", "gan_head_2")]
    assert sorted(trainer.groups["critic"].modules) == sorted(n for pair in pairs for n in pair)
    turns = 0
    for group, has in rec.grads:
        if group == "critic":
            assert all(has[n] for pair in pairs for n in pair)
            turns += 1
        else:
            assert not any(has[n] for pair in pairs for n in pair)
    assert turns == 8

    nets, teacher = trainer.nets, trainer.nets.teacher
    cond = trainer.batch(0).cond.index(slice(0, 2))
    x, sigma = torch.randn(2, *teacher.sample_shape), torch.full((2,), 1.0)
    before = [players(trainer.ctx, nets, cond, None, level=k).fake(x, sigma) for k in range(3)]
    with torch.no_grad():
        for p in nets.get("fake_score_2").parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = [players(trainer.ctx, nets, cond, None, level=k).fake(x, sigma) for k in range(3)]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[2], after[2])


def test_multistep_sampler_uses_the_trained_levels(class_teacher, tmp_path):
    """A 4-step DMD2 run samples with 1, 2 and 4 steps; the 2-step levels are among the 4 trained ones. The tiny
    teacher has DDPM's linear betas, so the student is capped by default (docs/CONDITIONING.md): its network reads
    every level above the cap (timesteps 999, 749 and 499) at the cap's timestep 395, the others at their own."""
    from fewstep.distribution import Schedule, generator_levels
    from fewstep.sampling import generate

    trainer, _ = run_tiny(tiny_run_config(class_teacher, {"name": "dmd2", "num_steps": 4, "ratio": 1}, steps=2,
                                          validation={"steps": [1, 2, 4]}), tmp_path / "r")
    sched = Schedule.of(trainer.ctx.method, trainer.nets.teacher.process)
    assert set(generator_levels(sched.grid, 2).tolist()) <= set(sched.levels.tolist())
    noise, cond = trainer.validation_inputs()
    seen = []
    handle = trainer.nets.ema.model.register_forward_pre_hook(  # the backbone passes timestep by keyword
        lambda m, args, kwargs: seen.append(kwargs["timestep"][0].item()), with_kwargs=True)
    for k in (1, 2, 4):
        out = generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, cond, k)
        assert out.shape == noise.shape and torch.isfinite(out).all()
    handle.remove()
    process = trainer.nets.teacher.process
    cap = trainer.nets.ema.input_cap
    assert cap is not None and cap.timestep == 395
    expected = [min(process.sigma_to_t(s).item(), cap.timestep) for k in (1, 2, 4)
                for s in generator_levels(sched.grid, k)]
    assert seen == pytest.approx(expected, rel=1e-5)
    assert sum(t == pytest.approx(395.0) for t in seen) == 1 + 2 + 3  # 999 (1, 2, 4 steps), 499 (2, 4), 749 (4)


def test_explicit_levels_train_and_sample_where_they_say(class_teacher, tmp_path):
    """method.levels replaces the evenly spaced generator levels: the 4-step run trains on them (the schedule's
    levels) and its 1/2/4-step samplers call the network at their timesteps only; the config refuses a wrong
    count, a non-descending list and levels next to sigma_max."""
    from fewstep.config import ConfigError
    from fewstep.distribution import Schedule
    from fewstep.export import renoise_sampler
    from fewstep.sampling import generate

    levels = [2.0, 1.5, 1.0, 0.71]
    method = {"name": "dmd2", "num_steps": 4, "ratio": 1, "levels": levels}
    trainer, _ = run_tiny(tiny_run_config(class_teacher, method, steps=2, validation={"steps": [1, 2, 4]}),
                          tmp_path / "r")
    process = trainer.nets.teacher.process
    sched = Schedule.of(trainer.ctx.method, process)
    timesteps = [round(process.sigma_to_t(s).item()) for s in sched.levels]
    assert timesteps == [round(process.sigma_to_t(torch.tensor(v)).item()) for v in levels]
    assert renoise_sampler(process, sched.levels).timesteps == tuple(timesteps)  # the stock LCMScheduler export
    noise, cond = trainer.validation_inputs()
    seen = []
    handle = trainer.nets.ema.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(round(kwargs["timestep"][0].item())), with_kwargs=True)
    for k in (1, 2, 4):
        assert torch.isfinite(generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, cond, k)).all()
    handle.remove()
    cap = trainer.nets.ema.input_cap.timestep                       # 395: sigma 2 (timestep 396) reads the cap's
    called = [min(t, cap) for t in timesteps]
    assert seen == called[:1] + called[0::2] + called
    for bad, match in (({"levels": [2.0, 1.0]}, "2 levels for num_steps=4"),
                       ({"levels": [2.0, 1.0, 1.5, 0.5]}, "strictly descending"),
                       ({"levels": levels, "sigma_max": 2.0}, "set one of them")):
        with pytest.raises(ConfigError, match=match):
            tiny_run_config(class_teacher, {**method, **bad})


def test_a_pair_store_made_at_another_guidance_is_refused(class_teacher, tmp_path):
    """DMD's regression pairs must be the real score's (guided) ODE solutions (§1.4)."""
    pairs = {"pairs": str(tiny_pairs(class_teacher))}
    with pytest.raises(ValueError, match="made at guidance 1 but the real score uses 2"):
        run_tiny(tiny_run_config(class_teacher, {"name": "dmd", "real_guidance": 2.0}, steps=1, data=pairs),
                 tmp_path / "a")
    run_tiny(tiny_run_config(class_teacher, {"name": "dmd", "real_guidance": 1.0}, steps=1, data=pairs),
             tmp_path / "b")


def test_chain_probe_rows_match_the_sampler_and_the_teacher(class_teacher, tmp_path):
    """examples/dmd2_chain_probe.py: its N-level row is the plugin's N-step sampler, its (N-1)+generator row is
    the same draw for draw, a one-step Euler ODE tail is the teacher's x0 at that level, and bad rows are refused."""
    import importlib.util

    from fewstep.sampling import eval_mode, generate

    spec = importlib.util.spec_from_file_location("chain_probe", Path(__file__).parents[1] / "examples" /
                                                  "dmd2_chain_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    trainer, _ = run_tiny(tiny_run_config(class_teacher, {"name": "dmd2", "num_steps": 4, "ratio": 1}, steps=2),
                          tmp_path / "r")
    noise, cond = trainer.validation_inputs()
    nets = trainer.nets

    def row(first, tail, **kw):
        with eval_mode(*[nets.get(n) for n in nets.names()]):
            return probe.chain(trainer, noise, cond, first, tail, torch.Generator().manual_seed(7), **kw)

    full = generate(trainer.pm.hook, trainer.ctx, nets, noise, cond, 4, seed=7)
    torch.testing.assert_close(row(4, None), full)
    torch.testing.assert_close(row(3, "generator"), full)
    assert not torch.allclose(row(3, None), full)
    torch.testing.assert_close(row(2, "ode", ode_steps=1), row(2, "teacher"))
    assert torch.isfinite(row(1, "ode", ode_steps=3)).all()
    assert probe.parse_row("3+ode", 4) == (3, "ode") and probe.parse_row("4", 4) == (4, None)
    for bad in ("4+teacher", "0", "5", "3+gan", "x"):
        with pytest.raises(ValueError, match="row"):
            probe.parse_row(bad, 4)
