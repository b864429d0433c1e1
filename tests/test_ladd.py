"""ladd plugin (``ladd``, ``add``): conformance on the UNet and DiT tiny teachers, the hinge losses the two turns
compute from known discriminator logits, that only the head's group trains it while the generator's gradient
passes through the frozen teacher, ADD's distillation term against a Gaussian teacher, the re-noising levels,
and the configuration error without a pair store."""

from __future__ import annotations

from pathlib import Path

import fewstep_plugins.ladd as ladd
import pytest
import torch

from fewstep.diffusion import VPProcess
from fewstep.gan import LevelHeads
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_pairs, tiny_run_config


class TestLADDConformance(MethodConformance):
    method = {"name": "ladd"}
    backbones = ("unet", "dit")
    steps = 3

    def config(self, teacher, **sections):
        sections["data"] = {**sections.get("data", {}), "pairs": str(tiny_pairs(teacher))}
        return super().config(teacher, **sections)


class TestADDConformance(MethodConformance):
    """Two student levels trained on noised real digits with the approximated R1 and one head on the bottleneck
    (LADD's conformance runs the default, a head per feature level), sampled with 1 and 2 steps."""

    method = {"name": "add", "num_steps": 2, "r1_weight": 1.0, "gan_heads": "bottleneck"}
    backbones = ("unet",)
    steps = 3


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("ladd") / "t", "unet")


def setup_trainer(config, run_dir):
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    trainer = Trainer(config, build_manager(config.method.name), run_dir)
    trainer.setup()
    return trainer


def turn(trainer, name):
    group = trainer.groups[name]
    return trainer.pm.hook.fewstep_loss(ctx=trainer.ctx, group=group, batch=trainer.batch(0), nets=trainer.nets,
                                        step=trainer.step_info(0, group))


def test_hinge_losses_on_known_logits(teacher, tmp_path, monkeypatch):
    """The disc turn reads real logits then fake ones; the generator turn the fake ones."""
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, 0.0, 1.0, 0.3])
    queue: list[torch.Tensor] = []
    monkeypatch.setattr(ladd, "teacher_critic", lambda nets, cond: lambda x, s: queue.pop(0) + 0 * x.sum())
    trainer = setup_trainer(tiny_run_config(teacher, {"name": "ladd", "real": "data"}, steps=1), tmp_path / "r")
    queue[:] = [real, fake]
    out = turn(trainer, "disc")
    torch.testing.assert_close(out.loss, torch.tensor([0.0, 0.5, 2.0, 1.0]) + torch.tensor([0.0, 1.0, 2.0, 1.3]))
    queue[:] = [fake]
    torch.testing.assert_close(turn(trainer, "generator").loss, -fake)


def test_level_heads_each_take_their_own_hinge_loss_then_average(teacher, tmp_path, monkeypatch):
    """With ``heads: levels`` the critic gives (B, L) logits; each head's hinge loss is taken on its own column
    and the L losses are averaged per sample (not the hinge of the averaged logits: head 0 confident, head 1
    wrong, the mean of their logits would hide head 1's loss)."""
    real = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    fake = torch.tensor([[-2.0, 1.0], [0.0, -3.0]])
    queue: list[torch.Tensor] = []
    seen: list[str] = []

    def critic(nets, cond):
        seen.append(nets.extra["disc_head"].__class__.__name__)
        return lambda x, s: queue.pop(0) + 0 * x.sum()

    monkeypatch.setattr(ladd, "teacher_critic", critic)
    trainer = setup_trainer(tiny_run_config(teacher, {"name": "ladd", "real": "data", "gan_heads": "levels"}, steps=1,
                                            batch=2), tmp_path / "r")
    assert isinstance(trainer.nets.extra["disc_head"], LevelHeads)
    queue[:] = [real, fake]
    real_hinge = torch.tensor([[0.0, 2.0], [0.5, 0.5]])
    fake_hinge = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    torch.testing.assert_close(turn(trainer, "disc").loss, (real_hinge + fake_hinge).mean(-1))
    queue[:] = [fake]
    torch.testing.assert_close(turn(trainer, "generator").loss, -fake.mean(-1))
    assert seen == ["LevelHeads", "LevelHeads"]


def test_patch_heads_judge_a_grid_of_cells_per_level_of_the_frozen_teacher(teacher, tmp_path):
    """``gan_head_grid: 2``: the teacher's critic gives 4 logits per feature level; the disc turn's loss is each
    cell's hinge loss averaged (so it is the loss of the cells' logits, recomputed here) and trains every head;
    the generator's is minus their mean."""
    from fewstep.gan import discriminator_loss
    from fewstep.types import Cond

    trainer = setup_trainer(tiny_run_config(teacher, {"name": "ladd", "real": "data", "gan_head_grid": 2}, steps=1),
                            tmp_path / "r")
    head = trainer.nets.extra["disc_head"]
    assert isinstance(head, LevelHeads) and all(h.grid == 2 for h in head.heads)
    x, sigma = torch.randn(4, *trainer.nets.teacher.sample_shape), torch.full((4,), 0.7)
    cond = Cond(labels=torch.arange(4)) if trainer.nets.teacher.conditioning == "class" else None
    logits = ladd.teacher_critic(trainer.nets, cond)(x, sigma)
    assert logits.shape == (4, 4 * len(head.heads))
    torch.testing.assert_close(discriminator_loss(logits, -logits, "hinge"),
                               (torch.relu(1 - logits) + torch.relu(1 - logits)).mean(-1))
    out = turn(trainer, "disc")
    assert out.loss.shape == (trainer.config.train.batch_size,) and torch.isfinite(out.loss).all()
    out.loss.mean().backward()  # the last bias's gradient cancels while every hinge is active: the weights
    assert all(h.net[-1].weight.grad is not None and h.net[-1].weight.grad.abs().sum() > 0 for h in head.heads)


def test_r1_adds_half_gamma_times_the_penalty_on_the_real_inputs(teacher, tmp_path, monkeypatch):
    """The disc turn's loss gains gamma/2 ((D(x_real + std n) - D(x_real)) / std)² per sample, x_real the
    re-noised real input, and nothing else (the R1 noise is drawn last, so the hinge terms see the same draws);
    with a linear D the term is (a · sum n)², the same at any std for the same n."""
    a, gamma = 0.3, 2.0
    inputs: list[torch.Tensor] = []

    def linear_critic(nets, cond):
        def critic(x, sigma):
            inputs.append(x.detach().clone())
            return a * x.flatten(1).sum(1)
        return critic

    monkeypatch.setattr(ladd, "teacher_critic", linear_critic)
    losses, penalties = {}, {}
    for name, extra in {"off": {}, "std 0.05": {"r1_weight": gamma}, "std 0.5": {"r1_weight": gamma, "r1_std": 0.5}}.items():
        trainer = setup_trainer(tiny_run_config(teacher, {"name": "ladd", "real": "data", **extra}, steps=1),
                                tmp_path / name.replace(" ", ""))
        inputs.clear()
        losses[name] = turn(trainer, "disc")
        if extra:
            real_in, perturbed = inputs[0], inputs[2]  # the real input, the fake one, then the perturbed real one
            penalties[name] = (a * ((perturbed - real_in) / extra.get("r1_std", 0.05)).flatten(1).sum(1)) ** 2
            torch.testing.assert_close(losses[name].terms["r1"], penalties[name].mean(), rtol=1e-3, atol=1e-4)
    assert "r1" not in losses["off"].terms
    for name, penalty in penalties.items():
        torch.testing.assert_close(losses[name].loss - losses["off"].loss, 0.5 * gamma * penalty, rtol=1e-3, atol=1e-4)
        assert penalty.min() > 0
    torch.testing.assert_close(penalties["std 0.05"], penalties["std 0.5"], rtol=1e-3, atol=1e-4)


def test_only_the_disc_group_trains_the_head_and_the_teacher_never(teacher, tmp_path):
    from fewstep.nn import requires_grad

    trainer = setup_trainer(tiny_run_config(teacher, {"name": "ladd", "real": "data"}, steps=1), tmp_path / "r")
    head, student = trainer.nets.extra["disc_head"], trainer.nets.student
    with requires_grad([head], False):  # the trainer freezes the other group's networks
        turn(trainer, "generator").loss.mean().backward()
    assert all(p.grad is None for p in head.parameters())
    assert student.model.conv_in.weight.grad.abs().sum() > 0  # through the frozen teacher's features
    student.zero_grad(set_to_none=True)
    with requires_grad([student], False):
        turn(trainer, "disc").loss.mean().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in trainer.nets.teacher.net.parameters())


def test_add_distillation_term_against_a_gaussian_teacher():
    """c(sigma)·mean (x − D(x + sigma eps))² with D exact for N(m, s²) data; gradient 2c(x − D)/n, alpha_bar c."""
    torch.manual_seed(0)
    m, s = 0.5, 0.4

    def gaussian(x, sigma):
        return m + (s**2 / (s**2 + sigma**2)).view(-1, 1, 1, 1) * (x - m)

    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    sigma, eps = torch.tensor([0.3, 1.0, 4.0]), torch.randn(3, 1, 4, 4)
    loss = ladd.distill_loss(x, gaussian, sigma, eps, "alpha_bar")
    target = gaussian(x.detach() + sigma.view(-1, 1, 1, 1) * eps, sigma)
    c = 1 / (1 + sigma**2)
    torch.testing.assert_close(loss, c * (x.detach() - target).square().flatten(1).mean(1))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, 2 * c.view(-1, 1, 1, 1) * (x.detach() - target) / 16)
    fixed = torch.full((3, 1, 4, 4), m)  # the data mean with eps = 0 is a fixed point of the teacher
    assert ladd.distill_loss(fixed, gaussian, sigma, torch.zeros_like(eps), "uniform").abs().max() < 1e-7


def test_renoise_levels_are_lognormal_in_the_teachers_range():
    from fewstep.types import StepInfo

    cfg = ladd.LADDConfig(renoise_mean=1.0, renoise_std=0.5)
    process = VPProcess()
    step = StepInfo(step=0, nimg=0, total_nimg=1, phase="train", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(0), local_batch=4096, global_batch=4096)
    sigma = ladd.renoise_levels(cfg, process, step)
    assert sigma.min() >= process.sigma_min and sigma.max() <= process.sigma_max
    assert sigma.log().mean().item() == pytest.approx(1.0, abs=0.05)
    assert sigma.log().std().item() == pytest.approx(0.5, abs=0.05)


def test_ladd_on_pairs_needs_a_store(teacher, tmp_path):
    with pytest.raises(ValueError, match="fewstep pairs"):
        run_tiny(tiny_run_config(teacher, {"name": "ladd"}, steps=1), tmp_path / "a")


@pytest.mark.parametrize("first_input", ["noise", "real"])
def test_first_level_input_is_pure_noise_or_noised_real_samples(first_input):
    """k = 0 (one level): the student reads sigma_max·z (``noise``, DMD2) or x_real + sigma_max·z (``real``, ADD's
    x_s at 999); the same z either way, drawn from the step's generator."""
    from fewstep.types import StepInfo

    def step():
        return StepInfo(step=0, nimg=0, total_nimg=1, phase="train", phase_progress=0.0, progress=0.0,
                        generator=torch.Generator().manual_seed(3), local_batch=2, global_batch=2)

    seen = []

    def student(x, sigma):
        seen.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x)

    cfg = ladd.ADDConfig(first_input=first_input)
    x_real = torch.full((2, 1, 4, 4), 0.25)
    ladd.generate(cfg, torch.tensor([14.6]), student, x_real, step(), VPProcess().x0_clip)
    z = step().randn(1, 4, 4)
    x_in, sigma = seen[0]
    torch.testing.assert_close(sigma, torch.full((2,), 14.6))
    torch.testing.assert_close(x_in, (x_real if first_input == "real" else 0.0) + 14.6 * z)


def test_real_first_input_is_refused_at_a_level_where_it_shows_through_the_noise():
    """``first_input: real`` below sigma 5 trains on inputs the sampler never gives (real images are 24 % of the
    input's std at sigma 2): refused with the fix, for both methods; above it, with noise, or at the grid's top
    (sigma_max unset) accepted."""
    from pydantic import ValidationError

    for config in (ladd.ADDConfig, ladd.LADDConfig):
        with pytest.raises(ValidationError, match=r"sigma_max=2 .* about 24% real image.*first_input: noise"):
            config(first_input="real", sigma_max=2.0)
        assert config(first_input="real", sigma_max=14.6).sigma_max == 14.6
        assert config(first_input="real", sigma_max=ladd.MIN_REAL_INPUT_SIGMA).first_input == "real"
        assert config(first_input="noise", sigma_max=2.0).first_input == "noise"
        assert config(first_input="real").sigma_max is None
