"""ctm plugin: conformance on the three backbones (with and without the GAN phase) and its maths against
closed forms: the identity G(x, t, t) = x, the exact Gaussian PF-ODE jump, the global-distillation limit
u = s, the k and DSM noise laws, gamma-sampling's special cases, and the phase / group schedule
(consistency.md §7)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from fewstep_plugins import ctm
from torch import nn

from fewstep.diffusion import EDMProcess, edm_scalings, euler_step, heun_step, karras_sigmas
from fewstep.nn import frozen_copy
from fewstep.sampling import consistency_sample, consistency_sigmas
from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_run_config
from fewstep.types import Batch, Cond, Nets, StepInfo

SMALL = {"name": "ctm", "num_scales": 6, "num_heun_steps_max": 2}


class TestCTMConformance(MethodConformance):
    method = SMALL


class TestCTMGANConformance(MethodConformance):
    """Two steps of the ctm phase, then two of the gan phase: the disc group steps (before the student)."""

    method = {**SMALL, "gan_start_nimg": 8}


class TestCTMFlowConformance(MethodConformance):
    """A flow-matching teacher, fixed loss weights, the non-saturating GAN and pseudo-Huber distance."""

    method = {**SMALL, "gan_start_nimg": 8, "dsm_weight": 0.5, "gan_weight": 0.1, "gan_loss": "nonsaturating",
              "distance": "pseudo_huber", "gamma": 0.5}
    backbones = ("unet",)
    teacher_options = {"process": "flow"}


# ---------------------------------------------------------------------------------------------
# The (t, s) student on real tiny backbones


@pytest.mark.parametrize("process", ["vp", "edm", "flow"])
def test_jump_to_its_own_level_is_the_identity(process, tmp_path):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", process=process))
    student = ctm.fewstep_build_student(ctx=None, teacher=teacher)
    with torch.no_grad():  # make the s-embedding matter, so the check is not vacuous
        for p in student.scalar_embeddings.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g) * 3
    t = torch.tensor([0.05, 0.5, 2.0, 20.0])
    with torch.no_grad():
        assert torch.equal(ctm.jump(student, teacher.process, x, t, t, None), x)
        lower = ctm.jump(student, teacher.process, x, t, t / 2, None)
    assert not torch.allclose(lower, x)


@pytest.mark.parametrize("process", ["vp", "edm", "flow"])
def test_fresh_student_jumps_like_a_ddim_step_of_its_teacher(process, tmp_path):
    """The s input starts at zero, so g = the teacher's denoiser and G(x, t, s) = DDIM/Euler from t to s."""
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", process=process))
    student = ctm.fewstep_build_student(ctx=None, teacher=teacher)
    assert student.extra_scalars == ("s",) and all(p.requires_grad for p in student.parameters())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t, s = torch.tensor([0.3, 3.0, 30.0]), torch.tensor([0.1, 0.2, 29.0])
    with torch.no_grad():
        expected = euler_step(x, t, s, teacher.denoise(x, t))
        torch.testing.assert_close(ctm.jump(student, teacher.process, x, t, s, None), expected, rtol=1e-5, atol=1e-5)


def test_estimate_gradient_reaches_the_student_through_the_target_input_only(tmp_path):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet"))
    student = ctm.fewstep_build_student(ctx=None, teacher=teacher)
    target = frozen_copy(student)
    process = teacher.process
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 5
    t, u, s = torch.tensor([5.0, 5.0]), torch.tensor([2.0, 2.0]), torch.tensor([0.5, 0.5])
    eps = torch.full((2,), process.sigma_min)
    est, tgt = ctm.estimate_and_target(student, target, process, x_t, x_t, t, u, s, eps, None)
    assert est.requires_grad and not tgt.requires_grad
    est.sum().backward()
    assert all(p.grad is None for p in target.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


# ---------------------------------------------------------------------------------------------
# Gaussian data N(MU, S0^2) per pixel: exact denoiser and exact PF-ODE jump

MU, S0 = 0.3, 0.5
EPS, SMAX = 0.002, 80.0
PROCESS = EDMProcess(sigma_min=EPS, sigma_max=SMAX)


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def phi(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, mu: float = MU) -> torch.Tensor:
    """The exact PF-ODE jump from t to s: x(s) = mu + (x - mu) sqrt(S0^2 + s^2) / sqrt(S0^2 + t^2)."""
    return mu + (x - mu) * torch.sqrt(S0**2 + _b(s, x) ** 2) / torch.sqrt(S0**2 + _b(t, x) ** 2)


def gauss_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return MU + S0**2 / (S0**2 + _b(sigma, x) ** 2) * (x - MU)


def exact_g(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, mu: float = MU) -> torch.Tensor:
    """g in G's parameterisation: (phi - (s/t) x) / (1 - s/t); its limit at s = t is the denoiser D*."""
    r = _b(s / t, x)
    at_t = mu + S0**2 / (S0**2 + _b(t, x) ** 2) * (x - mu)
    safe = torch.where(r < 1, 1 - r, torch.ones_like(r))
    return torch.where(r < 1, (phi(x, t, s, mu) - r * x) / safe, at_t)


class AnalyticNet(nn.Module):
    """Stands in for an EDM backbone whose g(x, t, s) is ``g_fn``: it decodes sigma = exp(4 timestep) and
    s the same way (EDM model time 0.25 ln sigma) and returns F = (g - c_skip x) / c_out."""

    def __init__(self, g_fn) -> None:
        super().__init__()
        self.g_fn = g_fn
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, timestep, cond=None, s=None):
        t = torch.exp(4 * timestep.double())
        s = t if s is None else torch.exp(4 * s.double())
        c_skip, c_out, c_in = edm_scalings(t)
        x = x_in / _b(c_in, x_in)
        return (self.g_fn(x, t, s) - _b(c_skip, x) * x) / _b(c_out, x) + 0 * self.dummy


class GaussTeacher:
    def __init__(self) -> None:
        self.process, self.net = PROCESS, AnalyticNet(lambda x, t, s: gauss_denoiser(x, t))

    def denoise(self, x, sigma, cond=None, *, uncond=None, guidance=1.0):
        return self.process.denoise(self.net, x, sigma, cond)


def _x(n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Samples of the noisy marginal at sigma (B,): N(MU, S0^2 + sigma^2)."""
    z = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + torch.sqrt(S0**2 + _b(sigma, z) ** 2) * z


def test_exact_g_reproduces_the_closed_form_jump_and_composes():
    net = AnalyticNet(exact_g)
    t = torch.tensor([80.0, 10.0, 1.0, 0.3], dtype=torch.float64)
    u = torch.tensor([3.0, 2.0, 0.5, 0.1], dtype=torch.float64)
    s = torch.tensor([0.01, 0.5, 0.5, EPS], dtype=torch.float64)
    x = _x(4, t)
    direct = ctm.jump(net, PROCESS, x, t, s, None)
    torch.testing.assert_close(direct, phi(x, t, s), rtol=1e-10, atol=1e-10)
    composed = ctm.jump(net, PROCESS, ctm.jump(net, PROCESS, x, t, u, None), u, s, None)
    torch.testing.assert_close(composed, direct, rtol=1e-10, atol=1e-10)
    # g(x, t, t) is the exact denoiser, the quantity DSM trains.
    torch.testing.assert_close(PROCESS.denoise(net, x, t, None, s=ctm.s_input(PROCESS, t)), gauss_denoiser(x, t),
                               rtol=1e-10, atol=1e-10)


def test_teacher_solve_follows_the_closed_form_trajectory():
    teacher = GaussTeacher()
    grid = karras_sigmas(18, EPS, SMAX).double()
    n = torch.tensor([0, 3, 8, 13])
    k = 4
    x_t = _x(4, grid[n], seed=1)
    x_u = ctm.teacher_solve(teacher, grid, x_t, n, k, Batch(x0=None, cond=Cond()), 1.0)
    by_hand = x_t
    for j in range(k):
        by_hand = heun_step(teacher.denoise, by_hand, grid[n + j], grid[n + j + 1])
    assert torch.equal(x_u, by_hand)
    exact = phi(x_t, grid[n], grid[n + k])
    rel = (x_u - exact).flatten(1).norm(dim=1) / (x_t - exact).flatten(1).norm(dim=1)
    assert float(rel.max()) < 0.02  # Heun on 18 Karras levels, relative to the size of the move


def test_global_distillation_limit_u_equals_s():
    """u = s: the target is the teacher's trajectory solution mapped to eps, G_target(x_u, u, eps) bit for bit
    (the inner jump G(x_u, u, u) is the identity); with the exact map it is phi(x_t; t -> eps) up to Heun."""
    teacher = GaussTeacher()
    exact = AnalyticNet(exact_g)
    grid = karras_sigmas(18, EPS, SMAX).double()
    n, k = torch.tensor([1, 4, 9]), 5
    t, u = grid[n], grid[n + k]
    eps = torch.full_like(t, EPS)
    x_t = _x(3, t, seed=2)
    x_u = ctm.teacher_solve(teacher, grid, x_t, n, k, Batch(x0=None, cond=Cond()), 1.0)
    student = AnalyticNet(lambda x, a, b: exact_g(x, a, b, MU + 0.1))  # any student: the inner jump is exact
    est, tgt = ctm.estimate_and_target(student, exact, PROCESS, x_t, x_u, t, u, u, eps, None)
    assert torch.equal(tgt, ctm.jump(exact, PROCESS, x_u, u, eps, None))
    to_eps = phi(x_t, t, eps)
    rel = (tgt - to_eps).flatten(1).norm(dim=1) / (x_t - to_eps).flatten(1).norm(dim=1)
    assert float(rel.max()) < 0.02


def _gauss_student_loss(num_scales: int, student_mu: float) -> torch.Tensor:
    cfg = ctm.CTMConfig(sigma_min=EPS, sigma_max=SMAX, num_scales=num_scales, num_heun_steps_max=6, dsm_weight=0.0)
    x0 = MU + S0 * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ctx = SimpleNamespace(method=cfg, config=SimpleNamespace(teacher=SimpleNamespace(guidance=1.0)))
    student = AnalyticNet(lambda x, a, b: exact_g(x, a, b, student_mu))
    nets = Nets(GaussTeacher(), student, {"target": AnalyticNet(exact_g)})
    return ctm._student_loss(ctx, Batch(x0=x0, cond=Cond()), nets, _big_step(5, 64)).loss.detach()


def test_ctm_estimate_of_the_exact_map_is_the_closed_form_jump_to_eps(monkeypatch):
    seen = []
    real = ctm.distance
    monkeypatch.setattr(ctm, "distance", lambda a, b, *args: seen.append((a.detach(), b)) or real(a, b, *args))
    _gauss_student_loss(18, MU)
    est, _ = seen[0]
    step = _big_step(5, 64)
    k, n, _ = ctm.ctm_levels(step, 18, 6)
    t = karras_sigmas(18, EPS, SMAX).double()[n]
    x0 = MU + S0 * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_t = x0.float() + _b(t.float(), x0.float()) * step.randn_like(x0.float())
    torch.testing.assert_close(est.double(), phi(x_t.double(), t, torch.full_like(t, EPS)), rtol=1e-5, atol=1e-5)


def test_ctm_loss_of_the_exact_map_is_only_the_teacher_error():
    """With the exact teacher and the exact G for student and target, the loss is the teacher's Heun error
    alone: small next to a student with the wrong mean, and vanishing as the grid is refined."""
    ratios = {n: float(_gauss_student_loss(n, MU).mean() / _gauss_student_loss(n, MU + 0.2).mean()) for n in (18, 80)}
    assert ratios[18] < 0.05
    assert ratios[80] < ratios[18] / 20


# ---------------------------------------------------------------------------------------------
# Noise and step laws


def _big_step(seed: int, batch: int = 1) -> StepInfo:
    return StepInfo(step=0, nimg=0, total_nimg=1, phase="ctm", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(seed), local_batch=batch, global_batch=batch)


def test_heun_steps_are_drawn_with_probability_proportional_to_k():
    probs = ctm.heun_step_probs(5)
    torch.testing.assert_close(probs, torch.tensor([1, 2, 3, 4, 5]) / 15.0)
    counts = torch.zeros(5)
    draws = 6000
    for i in range(draws):
        k, _, _ = ctm.ctm_levels(_big_step(i), 18, 5)
        counts[k - 1] += 1
    # Binomial standard error at 6000 draws is below 0.0065 for every k.
    torch.testing.assert_close(counts / draws, probs, rtol=0, atol=0.025)


def test_levels_keep_sigma_min_le_s_le_u_lt_t_and_s_is_uniform():
    n_scales, batch = 10, 40000
    k, n, m = ctm.ctm_levels(_big_step(0, batch), n_scales, 3)
    assert ((n >= 0) & (n + k <= n_scales - 1) & (m >= n + k) & (m <= n_scales - 1)).all()
    assert set(n.tolist()) == set(range(n_scales - k))  # n uniform over every valid index
    first = m[n == 0] - k  # given n = 0, m - k is uniform on {0 .. N-1-k}
    freq = torch.bincount(first, minlength=n_scales - k).double() / first.numel()
    torch.testing.assert_close(freq, torch.full_like(freq, 1 / (n_scales - k)), rtol=0, atol=0.02)


def test_dsm_sigmas_are_the_lognormal_karras_mixture():
    cfg = ctm.CTMConfig()
    lo, hi = EPS, SMAX
    sigma = ctm.dsm_sigmas(_big_step(3, 40000), cfg, lo, hi).double()
    assert float(sigma.min()) >= lo and float(sigma.max()) <= hi
    a, b = hi ** (1 / 7), lo ** (1 / 7)

    def karras_cdf(x: float) -> float:  # P(sigma(u) <= x) for u ~ U[0, 0.7]
        u = (a - x ** (1 / 7)) / (a - b)
        return min(max((0.7 - u) / 0.7, 0.0), 1.0)

    for x in (0.05, 0.3, 0.5, 1.0, 5.0, 30.0):
        lognormal_cdf = 0.5 * (1 + math.erf((math.log(x) + 1.2) / (1.2 * math.sqrt(2))))
        expected = 0.5 * lognormal_cdf + 0.5 * karras_cdf(x)
        assert float((sigma <= x).double().mean()) == pytest.approx(expected, abs=0.01), x
    lowest_karras = ctm.karras_at(torch.tensor(0.7), lo, hi, 7.0)
    assert float(lowest_karras) == pytest.approx(0.32, abs=0.01)


def test_dsm_loss_is_the_weighted_denoising_error():
    net = AnalyticNet(exact_g)
    x0 = MU + S0 * torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    loss = ctm.dsm_loss(net, PROCESS, x0, sigma, z, 0.5, None)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    by_hand = weight * (gauss_denoiser(x0 + _b(sigma, x0) * z, sigma) - x0).flatten(1).square().mean(1)
    torch.testing.assert_close(loss.double(), by_hand, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# gamma-sampling


def _tiny_jump(tmp_path):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet"))
    student = ctm.fewstep_build_student(ctx=None, teacher=teacher).eval()
    with torch.no_grad():
        for p in student.scalar_embeddings.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))

    def G(x, t, s):
        with torch.no_grad():
            return ctm.jump(student, teacher.process, x, t, s, None)

    return G, teacher.process.sigma_min


@pytest.mark.parametrize("clamp", [False, True])
def test_gamma_one_is_the_cm_multistep_sampler(tmp_path, clamp):
    G, eps = _tiny_jump(tmp_path)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = consistency_sigmas(3, eps, 80.0)
    ours = ctm.gamma_sample(G, noise, sigmas, eps, 1.0, torch.Generator().manual_seed(9), clamp=clamp)
    cm = consistency_sample(lambda x, sigma: G(x, sigma, torch.full_like(sigma, eps)), noise, sigmas, eps,
                            torch.Generator().manual_seed(9), clamp=clamp)
    assert torch.equal(ours, cm)


def test_gamma_zero_is_deterministic_chaining(tmp_path):
    G, eps = _tiny_jump(tmp_path)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = [80.0, 5.0, 0.5]
    a = ctm.gamma_sample(G, noise, sigmas, eps, 0.0, torch.Generator().manual_seed(1))
    b = ctm.gamma_sample(G, noise, sigmas, eps, 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    x = noise * 80.0
    for t, s in zip([*sigmas], [*sigmas[1:], eps]):
        x = G(x, torch.full((3,), t), torch.full((3,), s))
    assert torch.equal(a, x)
    one = ctm.gamma_sample(G, noise, [80.0], eps, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(one, G(noise * 80.0, torch.full((3,), 80.0), torch.full((3,), eps)))


def test_gamma_sampler_levels_and_noise_follow_the_formula():
    calls = []

    def G(x, t, s):
        calls.append((float(t[0]), float(s[0])))
        return torch.zeros_like(x)

    noise = torch.ones(2, 1, 2, 2)
    gamma, eps, sigmas = 0.6, 0.002, [80.0, 4.0, 1.0]
    out = ctm.gamma_sample(G, noise, sigmas, eps, gamma, torch.Generator().manual_seed(0))
    levels = [*sigmas, eps]
    for i, (t, s) in enumerate(calls):
        assert t == pytest.approx(levels[i])
        assert s == pytest.approx(math.sqrt(1 - gamma**2) * (levels[i + 1] - eps) + eps)
    assert len(calls) == 3 and torch.equal(out, torch.zeros_like(out))


def test_gamma_zero_with_the_exact_map_is_exact_for_any_step_count():
    net = AnalyticNet(exact_g)

    def G(x, t, s):
        return ctm.jump(net, PROCESS, x, t.double(), s.double(), None)

    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = phi(noise * SMAX, torch.full((4,), SMAX), torch.full((4,), EPS))
    for steps in (1, 2, 4):
        out = ctm.gamma_sample(G, noise, consistency_sigmas(steps, EPS, SMAX), EPS, 0.0)
        torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Phases, groups, configuration


def test_gan_phase_schedule_and_groups(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    config = tiny_run_config(teacher, {**SMALL, "gan_start_nimg": 8, "disc_every_n_steps": 2, "disc_lr": 1e-3},
                             steps=5, batch=4)
    trainer, rec = run_tiny(config, tmp_path / "run")
    assert [p.name for p in trainer.phases] == ["ctm", "gan"]
    assert trainer.phases[0].duration_nimg == 8 and trainer.phases[1].groups == ("disc", "student")
    disc = trainer.groups["disc"]
    assert disc.modules == ("disc",) and disc.lr == 1e-3 and disc.every_n_steps == 2
    # steps 0, 1: ctm; steps 2, 3, 4: gan, the discriminator on even steps and before the student.
    assert [g for g, _ in rec.grads] == ["student", "student", "disc", "student", "student", "disc", "student"]
    assert all("student/gan" not in log for log in rec.logs[:2])
    assert all("student/gan" in log and "student/gan_weight" in log for log in rec.logs[2:])
    assert 0.01 <= rec.logs[-1]["student/gan_weight"] <= 10.0


def test_without_gan_there_is_one_group_and_the_target_is_a_slow_ema(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    config = tiny_run_config(teacher, SMALL, steps=1, batch=4, optimizer={"lr": 1e-2})
    trainer, rec = run_tiny(config, tmp_path / "run")
    assert list(trainer.groups) == ["student"] and [p.name for p in trainer.phases] == ["ctm"]
    assert set(trainer.nets.extra) == {"target", "ema"}
    # One step: theta^- = 0.999 theta_0 + 0.001 theta_1 (mu = 0.999), theta_0 being the teacher's weights.
    start = dict(trainer.nets.teacher.net.model.named_parameters())
    after = dict(trainer.nets.student.model.named_parameters())
    moved = 0
    for name, p in trainer.nets.extra["target"].model.named_parameters():
        torch.testing.assert_close(p, torch.lerp(start[name], after[name], 0.001), rtol=0, atol=1e-6)
        moved += not torch.equal(start[name], after[name])
    assert moved > 0


def test_config_errors_name_the_fields(tmp_path):
    with pytest.raises(ValueError, match="num_heun_steps_max"):
        ctm.CTMConfig(num_scales=6, num_heun_steps_max=6)
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    with pytest.raises(ValueError, match="gan_start_nimg"):
        run_tiny(tiny_run_config(teacher, {**SMALL, "gan_start_nimg": 8}, steps=2, batch=4), tmp_path / "run")
