"""guided plugin (Meng et al. guided distillation): conformance on conditional backbones, latent and
stochastic-sampler variants, and its maths against closed forms (distribution.md §4)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from fewstep_plugins import guided
from torch import nn

from fewstep.backbones import GUIDANCE_EMBED_SCALE
from fewstep.diffusion import (
    EDMProcess,
    VPProcess,
    ddim_step,
    edm_scalings,
    eps_from_x0,
    karras_sigmas,
    sample_ode,
)
from fewstep.hookspecs import hookimpl
from fewstep.nn import unwrap
from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, Recorder, make_tiny_teacher, run_tiny, tiny_run_config
from fewstep.types import Batch, Cond, Nets, OptimizerGroup, Phase, StepInfo

# Stage 1 for 4 images, rounds 8 -> 4 and 4 -> 2 for 8 images each: 20 images = 5 steps of 4, and the
# conformance resume test restarts mid-round (after 8 images, inside halve-4).
TINY = {"name": "guided", "stage1_nimg": 4, "round_nimg": 8, "start_steps": 8, "final_steps": 2}


class TestGuidedConformance(MethodConformance):
    method = TINY
    backbones = ("unet_condition", "dit")
    steps = 5


class TestGuidedClassUNetConformance(MethodConformance):
    """A class-conditional UNet2DModel teacher, sampled with the stochastic sampler."""

    method = {**TINY, "sampler": "stochastic"}
    backbones = ("unet",)
    teacher_options = {"conditioning": "class"}
    steps = 5


class TestGuidedLatentConformance(MethodConformance):
    method = TINY
    backbones = ("unet", "dit")
    teacher_options = {"latent": True, "conditioning": "class"}
    steps = 5


class TestGuidedFlowConformance(MethodConformance):
    """A flow-matching teacher: the same sigma-space maths on its t/(1 - t) levels."""

    method = TINY
    backbones = ("dit",)
    teacher_options = {"process": "flow"}
    steps = 5


# ---------------------------------------------------------------------------------------------
# Config, schedule and grid


def test_config_rejects_off_grid_and_out_of_range_values():
    with pytest.raises(ValueError, match="power of two"):
        guided.GuidedConfig(start_steps=48)
    with pytest.raises(ValueError, match="final_steps"):
        guided.GuidedConfig(start_steps=4, final_steps=8)
    with pytest.raises(ValueError, match="sample_w"):
        guided.GuidedConfig(w_min=0.0, w_max=2.0, sample_w=3.0)


def test_configure_rejects_a_run_too_short_for_every_round_and_off_grid_steps(tmp_path):
    short = tiny_run_config(None, TINY, steps=4, batch=4)  # 16 images < 4 + 2 x 8
    with pytest.raises(ValueError, match="train.total_nimg"):
        guided.fewstep_configure(config=short)
    guided.fewstep_configure(config=tiny_run_config(None, TINY, steps=5, batch=4))
    off = tiny_run_config(None, TINY, steps=5, batch=4, validation={"steps": [3]})
    with pytest.raises(ValueError, match="validation.steps"):
        guided.fewstep_configure(config=off)


def test_rounds_halve_the_steps_and_phases_are_declared_as_data():
    cfg = guided.GuidedConfig(start_steps=16, final_steps=2, stage1_nimg=100, round_nimg=50)
    assert guided.round_steps(cfg) == [8, 4, 2]
    assert [guided.steps_of_phase(cfg, p) for p in ("distill-w", "halve-8", "halve-4", "halve-2")] == [None, 8, 4, 2]
    with pytest.raises(ValueError, match="halve-16"):
        guided.steps_of_phase(cfg, "halve-16")
    groups = [OptimizerGroup("student", ("student",), lr=1e-4)]
    phases = guided.fewstep_phases(ctx=SimpleNamespace(method=cfg), groups=groups)
    assert [(p.name, p.groups, p.duration_nimg) for p in phases] == [
        ("distill-w", ("student",), 100), ("halve-8", ("student",), 50), ("halve-4", ("student",), 50),
        ("halve-2", ("student",), 50)]
    assert guided.round_steps(guided.GuidedConfig(start_steps=4, final_steps=4)) == []


def test_grid_is_nested_and_spans_the_teacher_range():
    process = VPProcess(prediction_type="v_prediction")
    cfg = guided.GuidedConfig(start_steps=64)
    finest = guided.grid(cfg, process, 64)
    torch.testing.assert_close(finest[:-1], karras_sigmas(64, process.sigma_min, process.sigma_max, 7.0))
    assert finest[-1] == 0 and finest[0] == pytest.approx(process.sigma_max)
    n = 32
    while n >= 1:
        coarse, fine = guided.grid(cfg, process, n), guided.grid(cfg, process, 2 * n)
        assert coarse.shape == (n + 1,)
        assert torch.equal(coarse, fine[::2]), n  # every other level of the previous round's grid
        n //= 2
    assert torch.equal(guided.grid(cfg, process, 1), torch.tensor([finest[0].item(), 0.0]))
    with pytest.raises(ValueError, match="nested grid"):
        guided.grid(cfg, process, 3)


# ---------------------------------------------------------------------------------------------
# Progressive-distillation target (§4.3) with a nonlinear closed-form denoiser


def wavy_denoiser(x: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor | float = 0.0) -> torch.Tensor:
    """A smooth nonlinear x0 predictor; sigma and w broadcast against x."""
    return torch.tanh(x) / (1 + sigma) * (1 + 0.1 * w) + 0.05 * torch.sin(3 * x) * sigma / (1 + sigma**2)


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def _two_teacher_steps(x, s, s_mid, s_next, w=0.0):
    """Two DDIM steps by hand: x' = x0 + (s'/s)(x - x0) (DDIM Eq. 12 in sigma space)."""
    x0 = wavy_denoiser(x, _b(s, x), w)
    x_mid = x0 + _b(s_mid / s, x) * (x - x0)
    x0_mid = wavy_denoiser(x_mid, _b(s_mid, x), w)
    return x0_mid + _b(s_next / s_mid, x) * (x_mid - x0_mid), x_mid, x0_mid


def test_a_student_step_with_the_pd_target_lands_on_two_teacher_steps():
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([80.0, 5.0, 1.2, 0.3], dtype=torch.float64)
    s_mid, s_next = s * 0.6, s * 0.25
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) * s.view(-1, 1, 1, 1)

    def denoise(x_, s_):
        return wavy_denoiser(x_, _b(s_, x_))

    target = guided.pd_target(denoise, x, s, s_mid, s_next)
    landed = ddim_step(x, s, s_next, target)  # the student's single DDIM step with x0 = target
    expected, _, _ = _two_teacher_steps(x, s, s_mid, s_next)
    torch.testing.assert_close(landed, expected, rtol=1e-10, atol=1e-10)
    # It is not simply the teacher's first x0: one teacher step s -> s_next lands elsewhere.
    assert not torch.allclose(ddim_step(x, s, s_next, denoise(x, s)), expected, atol=1e-3)


def test_pd_target_at_the_final_step_is_the_teacher_x0():
    g = torch.Generator().manual_seed(1)
    s = torch.tensor([157.0, 2.0, 0.4], dtype=torch.float64)
    s_mid, s_next = s / 3, torch.zeros(3, dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2

    def denoise(x_, s_):
        return wavy_denoiser(x_, _b(s_, x_))

    target = guided.pd_target(denoise, x, s, s_mid, s_next)
    _, x_mid, x0_mid = _two_teacher_steps(x, s, s_mid, s_next)
    # the teacher's x0 at (x_mid, s_mid): the second teacher step's prediction (not the first step's)
    torch.testing.assert_close(target, x0_mid, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(target, denoise(x, s), atol=1e-3)
    assert torch.equal(ddim_step(x, s, s_next, target), target)  # a DDIM step to 0 returns its x0


class WavyEDMNet(nn.Module):
    """An EDM backbone whose preconditioned denoiser is ``wavy_denoiser``, reading w from its input."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, timestep, cond=None, w=None):
        sigma = torch.exp(4 * timestep.to(torch.float64))
        c_skip, c_out, c_in = edm_scalings(sigma)
        x = x_in / _b(c_in, x_in)
        w_ = _b(w / GUIDANCE_EMBED_SCALE, x) if w is not None else 0.0
        d = wavy_denoiser(x, _b(sigma, x), w_)
        return (d - _b(c_skip, x) * x) / _b(c_out, x) + 0 * self.dummy


B = 64


def _step(phase: str, seed: int = 3) -> StepInfo:
    return StepInfo(step=0, nimg=0, total_nimg=100, phase=phase, phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(seed), local_batch=B, global_batch=B)


def _capture(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    seen = []
    real = guided.weighted_error

    def spy(pred, target, sigma, weighting):
        seen.append((pred.detach().clone(), target.detach().clone(), sigma.detach().clone()))
        return real(pred, target, sigma, weighting)

    monkeypatch.setattr(guided, "weighted_error", spy)
    return seen


def test_round_loss_targets_two_round_teacher_steps_from_a_student_grid_level(monkeypatch):
    seen = _capture(monkeypatch)
    process = EDMProcess(sigma_min=0.002, sigma_max=80.0)
    cfg = guided.GuidedConfig(start_steps=8, final_steps=2, w_min=0.5, w_max=3.0, sample_w=1.0)
    teacher = SimpleNamespace(process=process, vae=None)
    nets = Nets(teacher, WavyEDMNet(), {"round_teacher": WavyEDMNet()})
    x0 = torch.randn(B, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = guided.fewstep_loss(ctx=SimpleNamespace(method=cfg), group=None, batch=Batch(x0=x0, cond=Cond()),
                              nets=nets, step=_step("halve-2"))
    assert out.loss.shape == (B,)
    _, target, sigma = seen[0]
    # The same draws, in the hook's order: w, eps, then the student's grid index j.
    step = _step("halve-2")
    w = 0.5 + 2.5 * step.rand()
    eps = step.randn_like(x0)
    j = step.randint(0, 2)
    levels = guided.grid(cfg, process, 4)  # the round teacher's 4-step grid; the student takes 2 steps
    assert set(j.tolist()) == {0, 1}
    s, s_mid, s_next = levels[2 * j], levels[2 * j + 1], levels[2 * j + 2]
    torch.testing.assert_close(sigma, s)
    x = (x0 + _b(s, x0) * eps).double()
    expected, _, x0_mid = _two_teacher_steps(x, s.double(), s_mid.double(), s_next.double(), _b(w, x).double())
    last = j == 1  # s_next = 0: the final-step rule
    landed = ddim_step(x, s.double(), s_next.double(), target.double())
    torch.testing.assert_close(landed[~last], expected[~last], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(target.double()[last], x0_mid[last], rtol=1e-4, atol=1e-5)


def test_snr_trunc_weighting_is_the_larger_of_the_x_and_eps_errors():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    pred, target = torch.randn_like(x), torch.randn_like(x)
    sigma = torch.tensor([0.01, 0.5, 1.0, 2.0, 100.0], dtype=torch.float64)
    mse_x = (pred - target).square().flatten(1).mean(1)
    mse_eps = (eps_from_x0(x, pred, sigma) - eps_from_x0(x, target, sigma)).square().flatten(1).mean(1)
    loss = guided.weighted_error(pred, target, sigma, "snr_trunc")
    torch.testing.assert_close(loss, torch.maximum(mse_x, mse_eps).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(guided.weighted_error(pred, target, sigma, "x"), mse_x.float())


# ---------------------------------------------------------------------------------------------
# Stage 1 (§4.2) on a real tiny class-conditional teacher


def test_stage1_target_is_the_cfg_combination_and_the_student_starts_as_the_teacher(tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", conditioning="class"))
    cfg = guided.GuidedConfig(w_min=0.0, w_max=4.0)
    ctx = SimpleNamespace(method=cfg)
    student = guided.fewstep_build_student(ctx=ctx, teacher=teacher)
    assert student.extra_scalars == ("w",) and all(p.requires_grad for p in student.parameters())
    n = 8
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    cond = Cond(labels=torch.arange(n) % 10)
    uncond = teacher.null_cond(n)
    step = StepInfo(step=0, nimg=0, total_nimg=10, phase="distill-w", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(5), local_batch=n, global_batch=n)
    guided.fewstep_loss(ctx=ctx, group=None, batch=Batch(x0=x0, cond=cond, uncond=uncond),
                        nets=Nets(teacher, student), step=step)
    pred, target, sigma = seen[0]
    replay = StepInfo(step=0, nimg=0, total_nimg=10, phase="distill-w", phase_progress=0.0, progress=0.0,
                      generator=torch.Generator().manual_seed(5), local_batch=n, global_batch=n)
    w = 4.0 * replay.rand()
    eps = replay.randn_like(x0)
    t = replay.draw(lambda b, gen: teacher.process.sample_train_t(b, gen))
    torch.testing.assert_close(sigma, teacher.process.t_to_sigma(t).float())
    x = x0 + _b(sigma, x0) * eps
    with torch.no_grad():
        x_c = teacher.process.denoise(teacher.net, x, sigma, cond)  # two separate passes, same x
        x_u = teacher.process.denoise(teacher.net, x, sigma, uncond)
    torch.testing.assert_close(target, _b(1 + w, x) * x_c - _b(w, x) * x_u, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x_c, x_u, atol=1e-4)  # the combination is not trivially one branch
    # w enters through a zero-initialised embedding: at step 0 the student is the conditional teacher.
    torch.testing.assert_close(pred, x_c, rtol=1e-5, atol=1e-6)


def test_an_unconditional_teacher_is_refused_with_the_fix(tmp_path):
    folder = make_tiny_teacher(tmp_path / "u", "unet")
    teacher = load_teacher(folder)
    with pytest.raises(ValueError, match="teacher.pretrained.*conditional.*teacher.autoguidance"):
        guided.fewstep_build_student(ctx=SimpleNamespace(method=guided.GuidedConfig()), teacher=teacher)
    # ... and before anything is built (fewstep validate, distill's configure), from the folder's configs alone
    with pytest.raises(ValueError, match="teacher.pretrained.*conditional.*teacher.autoguidance"):
        guided.fewstep_configure(config=tiny_run_config(folder, TINY, steps=5, batch=4))
    guided.fewstep_configure(config=tiny_run_config(folder, TINY, steps=5, batch=4,
                                                    teacher={"autoguidance": str(folder)}))
    conditional = make_tiny_teacher(tmp_path / "c", "unet", conditioning="class")
    guided.fewstep_configure(config=tiny_run_config(conditional, TINY, steps=5, batch=4))


def test_an_autoguided_unconditional_teacher_guides_with_its_weak_checkpoint(tmp_path, monkeypatch):
    """§5.4: stage 1 targets D_weak + g (D - D_weak) with g = 1 + w, and the whole schedule runs."""
    main, weak = make_tiny_teacher(tmp_path / "main", "unet"), make_tiny_teacher(tmp_path / "weak", "unet", seed=1)
    teacher = load_teacher(main, weak=weak)
    cfg = guided.GuidedConfig(w_min=0.0, w_max=2.0, sample_w=1.0)
    student = guided.fewstep_build_student(ctx=SimpleNamespace(method=cfg), teacher=teacher)
    seen = _capture(monkeypatch)
    n = 6
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1

    def info() -> StepInfo:
        return StepInfo(step=0, nimg=0, total_nimg=10, phase="distill-w", phase_progress=0.0, progress=0.0,
                        generator=torch.Generator().manual_seed(10), local_batch=n, global_batch=n)

    guided.fewstep_loss(ctx=SimpleNamespace(method=cfg), group=None, batch=Batch(x0=x0, cond=Cond()),
                        nets=Nets(teacher, student), step=info())
    _, target, sigma = seen[0]
    replay = info()
    w = 2.0 * replay.rand()
    x = x0 + _b(sigma, x0) * replay.randn_like(x0)
    with torch.no_grad():
        d_main = teacher.process.denoise(teacher.net, x, sigma, Cond())
        d_weak = teacher.process.denoise(teacher.weak, x, sigma, Cond())
    torch.testing.assert_close(target, d_weak + _b(1 + w, x) * (d_main - d_weak), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(d_main, d_weak, atol=1e-4)
    method = {**TINY, "w_max": 2.0, "sample_w": 1.0}
    trainer, rec = run_tiny(tiny_run_config(main, method, steps=5, teacher={"autoguidance": str(weak)}),
                            tmp_path / "run")
    assert trainer.nets.teacher.autoguided and len(rec.logs) == 5
    assert all(torch.isfinite(torch.tensor(log["student/loss"])) for log in rec.logs)


# ---------------------------------------------------------------------------------------------
# Phases on a real run: halving and hand-over


def _equal(a: nn.Module, b: nn.Module) -> bool:
    other = b.state_dict()
    return all(torch.equal(v, other[k]) for k, v in unwrap(a).state_dict().items())


class HandOverSpy:
    """Wraps fewstep_loss: records the phase and whether round_teacher and the evaluation EMA equal the
    student right now (before this step's update)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, bool]] = []

    @hookimpl(wrapper=True)
    def fewstep_loss(self, nets, step):
        self.calls.append((step.phase, _equal(nets.student, nets.extra["round_teacher"]),
                           _equal(nets.student, nets.ema)))
        return (yield)


def test_phases_halve_the_steps_and_hand_the_student_over(tmp_path):
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    method = {"name": "guided", "stage1_nimg": 8, "round_nimg": 8, "start_steps": 4, "final_steps": 1}
    config = tiny_run_config(make_tiny_teacher(tmp_path / "t", "dit"), method, steps=6, batch=4,
                             optimizer={"lr": 1e-3})
    pm = build_manager("guided")
    spy, rec = HandOverSpy(), Recorder()
    pm.register(spy, name="spy")
    pm.register(rec, name="recorder")
    trainer = Trainer(config, pm, tmp_path / "run")
    nets = trainer.fit()
    phases = [p for p, _, _ in spy.calls]
    assert phases == ["distill-w"] * 2 + ["halve-2"] * 2 + ["halve-1"] * 2
    assert [guided.steps_of_phase(config.method, p) for p in phases] == [None, None, 2, 2, 1, 1]
    # At the first step of each round the round teacher is the previous phase's final student, and the
    # evaluation EMA restarts from it ...
    assert [same for p, same, _ in spy.calls if p != "distill-w"] == [True, False, True, False]
    assert [same for p, _, same in spy.calls if p != "distill-w"] == [True, False, True, False]
    # ... and the 1-step round always starts from the grid's top level, sigma_max.
    sigma_max = nets.teacher.process.sigma_max
    assert [log["student/sigma"] for log in rec.logs[4:]] == [pytest.approx(sigma_max, rel=1e-5)] * 2
    # No hand-over after the last round: the EMA of the final round is kept for sampling and export.
    assert not _equal(nets.student, nets.ema)
    # PD's learning rate: constant in stage 1, annealed linearly to 0 within each round.
    assert [log["student/lr"] for log in rec.logs] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 1e-3, 5e-4])
    # The 2-step round's model is kept (the round teacher of the last round) and samples 2-step rows.
    kept = nets.extra["steps_2"]
    assert bool(kept.round_done) and _equal(nets.extra["round_teacher"], kept)
    assert not _equal(nets.ema, kept)
    noise, cond = torch.randn(2, 1, 8, 8), Cond(labels=torch.tensor([1, 2]))
    ctx = trainer.ctx
    two = guided.fewstep_sample(ctx=ctx, nets=nets, noise=noise, cond=cond, num_steps=2, generator=None)
    by_hand = guided.fewstep_sample(ctx=ctx, nets=Nets(nets.teacher, kept, {}), noise=noise, cond=cond,
                                    num_steps=2, generator=None)
    torch.testing.assert_close(two, by_hand, rtol=0, atol=0)
    # The stochastic sampler's jumps span two nominal steps: its 4-step rows use the 2-step model.
    stochastic = dataclasses.replace(ctx, method=ctx.method.model_copy(update={"sampler": "stochastic"}))
    outs = [guided.fewstep_sample(ctx=stochastic, nets=n, noise=noise, cond=cond, num_steps=4,
                                  generator=torch.Generator().manual_seed(0)) for n in (nets, Nets(nets.teacher, kept, {}))]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_kept_rounds_must_be_rounds_of_the_run():
    assert guided.kept_steps(guided.GuidedConfig(start_steps=16, final_steps=2)) == [4]
    with pytest.raises(ValueError, match="not intermediate rounds"):
        guided.GuidedConfig(start_steps=16, final_steps=2, keep_steps=[2])


def _filled(value: float) -> nn.Module:
    net = nn.Linear(2, 2)
    nn.init.constant_(net.weight, value)
    nn.init.constant_(net.bias, value)
    return net


@pytest.mark.parametrize("with_ema", [False, True])
def test_hand_over_copies_the_sampling_network_into_round_teacher_and_student(with_ema):
    cfg = guided.GuidedConfig(start_steps=4, final_steps=1)
    student, round_teacher = _filled(1.0), _filled(3.0)
    weight = student.weight
    extra = {"round_teacher": round_teacher, **({"ema": _filled(2.0)} if with_ema else {})}
    nets = Nets(None, student, extra)
    expected = 2.0 if with_ema else 1.0  # the EMA when enabled, else the raw student (PD)
    guided.fewstep_on_phase_end(ctx=SimpleNamespace(method=cfg), phase=Phase("distill-w", ("student",)), nets=nets)
    for net in (round_teacher, student):
        assert all(bool((p == expected).all()) for p in net.parameters())
    assert student.weight is weight and student.weight.requires_grad  # the same parameters, still trained
    # After the last round nothing is handed over.
    nets.student.weight.data.fill_(5.0)
    guided.fewstep_on_phase_end(ctx=SimpleNamespace(method=cfg), phase=Phase("halve-1", ("student",)), nets=nets)
    assert bool((round_teacher.weight == expected).all())


# ---------------------------------------------------------------------------------------------
# Samplers (§4.4)

MU, S = 0.3, 0.5  # Gaussian data x0 ~ N(MU, S^2)


def test_the_back_step_has_the_forward_process_marginal():
    g = torch.Generator().manual_seed(6)
    n = 400_000
    x0 = MU + S * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    s_lo, s_hi = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.9, dtype=torch.float64)
    x_lo = x0 + s_lo * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    x_hi = guided.renoise(x_lo, s_lo, s_hi, g).flatten()
    # q(x at s_hi) = N(MU, S^2 + s_hi^2); standard errors: 0.003 (mean), 0.01 (variance)
    assert float(x_hi.mean()) == pytest.approx(MU, abs=0.015)
    assert float(x_hi.var()) == pytest.approx(S**2 + s_hi.item() ** 2, rel=0.01)
    # It only adds independent noise: the signal covariance stays S^2.
    cov = float(((x_hi - x_hi.mean()) * (x0.flatten() - x0.mean())).mean())
    assert cov == pytest.approx(S**2, rel=0.02)


def test_stochastic_sampler_jumps_two_levels_and_steps_back_one():
    levels = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    seen: list[float] = []

    def denoise(x, sigma):
        seen.append(float(sigma))
        return wavy_denoiser(x, sigma)

    out = guided.stochastic_sample(denoise, noise, levels, torch.Generator().manual_seed(8))
    assert seen == [80.0, 10.0, 2.0, 0.5]  # N evaluations, one per nominal level
    # By hand, with the same noise draws.
    g = torch.Generator().manual_seed(8)
    x = noise * 80.0
    for k in range(3):
        x = ddim_step(x, levels[k], levels[k + 2], wavy_denoiser(x, levels[k]))
        x = x + torch.sqrt(levels[k + 1] ** 2 - levels[k + 2] ** 2) * torch.randn(x.shape, generator=g,
                                                                                    dtype=x.dtype)
    torch.testing.assert_close(out, wavy_denoiser(x, levels[3]))  # last: deterministic step to 0
    # With one step it is a single DDIM step from sigma_max.
    one = guided.stochastic_sample(lambda x_, s_: wavy_denoiser(x_, s_), noise, levels[[0, -1]], None)
    torch.testing.assert_close(one, sample_ode(lambda x_, s_: wavy_denoiser(x_, _b(s_, x_)), noise * 80.0,
                                               levels[[0, -1]], "ddim"))
