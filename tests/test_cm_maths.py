"""Closed-form checks of plugins/cm.py: curricula, the iCT pair distribution, the boundary condition,
and CD / CT losses against a Gaussian data distribution whose denoiser and consistency map are known
exactly (consistency.md §1-3)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from fewstep_plugins import cm
from torch import nn

from fewstep.backbones import GUIDANCE_EMBED_SCALE
from fewstep.diffusion import EDMProcess, edm_scalings, karras_sigmas
from fewstep.teacher import load_teacher
from fewstep.testing import make_tiny_teacher
from fewstep.types import Batch, Cond, Nets, OptimizerGroup, StepInfo

# ---------------------------------------------------------------------------------------------
# Curricula


def _ct_n_by_hand(p: float, s0: int, s1: int) -> int:
    return math.ceil(math.sqrt(p * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


@pytest.mark.parametrize("s0,s1", [(2, 150), (2, 200), (10, 1280)])
def test_ct_num_scales_formula_and_ends(s0, s1):
    assert cm.ct_num_scales(0.0, s0, s1) == s0
    assert cm.ct_num_scales(1.0, s0, s1) == s1 + 1
    values = [cm.ct_num_scales(i / 200, s0, s1) for i in range(201)]
    assert values == [_ct_n_by_hand(i / 200, s0, s1) for i in range(201)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_ct_num_scales_hand_values():
    # 0.5 * (151^2 - 4) + 4 = 11402.5; sqrt = 106.78...; ceil(105.78) + 1 = 107
    assert cm.ct_num_scales(0.5, 2, 150) == 107
    # 0.25 * 22797 + 4 = 5703.25; sqrt = 75.52...; ceil(74.52) + 1 = 76
    assert cm.ct_num_scales(0.25, 2, 150) == 76


def test_ct_target_decay_uses_n_minus_one():
    # Official code: mu = exp(s0 ln mu0 / (N - 1)); at the start N = s0 = 2, so mu = mu0^2 (not mu0).
    assert cm.ct_target_decay(0.0, 2, 150, 0.9) == pytest.approx(0.81, rel=1e-12)
    for p in (0.0, 0.3, 0.7, 1.0):
        n = _ct_n_by_hand(p, 2, 150)
        assert cm.ct_target_decay(p, 2, 150, 0.9) == pytest.approx(math.exp(2 * math.log(0.9) / (n - 1)), rel=1e-12)
    decays = [cm.ct_target_decay(i / 50, 2, 150, 0.9) for i in range(51)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))  # mu grows with N


def test_ict_num_scales_doubling_stages():
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    mids = [(j + 0.5) / 8 for j in range(8)]
    assert [cm.ict_num_scales(p, 10, 1280) for p in mids] == expected
    assert cm.ict_num_scales(0.0, 10, 1280) == 11
    assert cm.ict_num_scales(1.0, 10, 1280) == 1281


# ---------------------------------------------------------------------------------------------
# iCT pair distribution


def _lognormal_mass(asc: torch.Tensor, p_mean: float, p_std: float) -> list[float]:
    cdf = [0.5 * (1 + math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std))) for s in asc.double().tolist()]
    mass = [b - a for a, b in zip(cdf, cdf[1:])]
    total = sum(mass)
    return [m / total for m in mass]


@pytest.mark.parametrize("n", [11, 41, 161])
def test_ict_pair_probs_is_the_lognormal_mass(n):
    asc = karras_sigmas(n, 0.002, 80.0).flip(0)
    p = cm.ict_pair_probs(asc, -1.1, 2.0)
    assert p.shape == (n - 1,)
    assert (p >= 0).all()
    assert float(p.double().sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(p.double(), torch.tensor(_lognormal_mass(asc, -1.1, 2.0), dtype=torch.float64),
                               rtol=1e-5, atol=1e-9)


def _argmax_log_sigma(asc: torch.Tensor, p_mean: float, p_std: float) -> float:
    """ln sigma at the middle of the heaviest interval."""
    i = int(cm.ict_pair_probs(asc, p_mean, p_std).argmax())
    return 0.5 * float(asc[i].log() + asc[i + 1].log())


def test_ict_pair_probs_argmax_near_the_lognormal_mode():
    # The probabilities are float32 and flat near the maximum, so the argmax is located to a few 1e-3 in ln sigma.
    p_mean, p_std = -1.1, 2.0
    # On a log-uniform grid every interval has the same width in ln sigma: the heaviest one holds exp(P_mean).
    geo = torch.logspace(math.log10(0.002), math.log10(80.0), 4001, dtype=torch.float64)
    assert _argmax_log_sigma(geo, p_mean, p_std) == pytest.approx(p_mean, abs=0.02)
    # On a Karras grid the ln-sigma width scales as sigma^(-1/rho), which moves the heaviest interval
    # to ln sigma = P_mean - P_std^2 / rho (about -1.67), away from P_mean.
    karras = karras_sigmas(4001, 0.002, 80.0).double().flip(0)
    peak = _argmax_log_sigma(karras, p_mean, p_std)
    assert peak == pytest.approx(p_mean - p_std**2 / 7.0, abs=0.02)
    assert abs(peak - p_mean) > 0.5


# ---------------------------------------------------------------------------------------------
# Boundary condition on real tiny backbones


@pytest.mark.parametrize("process", ["vp", "edm", "flow"])
def test_consistency_fn_boundary_condition(process, tmp_path):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", process=process))
    cfg = cm.CDConfig()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma_min = teacher.process.sigma_min
    with torch.no_grad():
        f = cm.consistency_fn(teacher.net, teacher.process, cfg, x, torch.full((3,), sigma_min), None)
        assert torch.equal(f, x)
        # Away from the boundary the network does contribute.
        g = cm.consistency_fn(teacher.net, teacher.process, cfg, x, torch.full((3,), 1.0), None)
        assert not torch.allclose(g, x)


# ---------------------------------------------------------------------------------------------
# Gaussian data: exact denoiser and exact consistency map

MU, S = 0.3, 0.5  # x0 ~ N(MU, S^2) per pixel
EPS = 0.002


def gauss_denoiser(x: torch.Tensor, sigma: torch.Tensor, mu: float = MU) -> torch.Tensor:
    """D*(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu); sigma broadcast against x."""
    return mu + S**2 / (S**2 + sigma**2) * (x - mu)


def gauss_consistency(x: torch.Tensor, sigma: torch.Tensor, mu: float = MU) -> torch.Tensor:
    """f*(x, sigma) = mu + sqrt(s^2 + eps^2)/sqrt(s^2 + sigma^2) (x - mu): the PF-ODE map to sigma = eps."""
    return mu + math.sqrt(S**2 + EPS**2) / torch.sqrt(S**2 + sigma**2) * (x - mu)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class AnalyticEDMNet(nn.Module):
    """Behaves like an EDM backbone whose preconditioned denoiser is ``denoiser(x, sigma)``.

    forward(x_in, timestep) recovers sigma = exp(4 timestep), x = x_in / c_in and returns
    F = (D - c_skip x) / c_out, so that EDMProcess.denoise gives back D.
    """

    def __init__(self, denoiser, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.denoiser, self.sigma_data = denoiser, sigma_data
        self.dummy = nn.Parameter(torch.zeros(()))  # so it has parameters like a real network

    def forward(self, x_in, timestep, cond=None, **scalars):
        sigma = torch.exp(4 * timestep.to(torch.float64))
        c_skip, c_out, c_in = edm_scalings(sigma, self.sigma_data)
        x = x_in / _bcast(c_in, x_in)
        d = self.denoiser(x, _bcast(sigma, x))
        return (d - _bcast(c_skip, x) * x) / _bcast(c_out, x) + 0 * self.dummy


def student_denoiser(mu: float):
    """The denoiser D whose consistency_from_denoiser is f*(., .; mu).

    consistency_from_denoiser gives f = (c_skip_cm - r c_skip_edm) x + r D with r = (sigma - eps)/sigma,
    so D = (f* - (c_skip_cm - r c_skip_edm) x) / r (any finite value at sigma = eps, where r = 0)."""

    def d(x, sigma):
        sd = 0.5
        c_skip_cm = sd**2 / ((sigma - EPS) ** 2 + sd**2)
        c_skip_edm = sd**2 / (sigma**2 + sd**2)
        r = (sigma - EPS) / sigma
        f = gauss_consistency(x, sigma, mu)
        safe = torch.where(r > 0, r, torch.ones_like(r))
        return torch.where(r > 0, (f - (c_skip_cm - r * c_skip_edm) * x) / safe, x)

    return d


class GaussTeacher:
    def __init__(self, process, net) -> None:
        self.process, self.net = process, net
        self.vae, self.conditioning, self.num_classes = None, "none", None

    def denoise(self, x, sigma, cond=None, *, uncond=None, guidance=1.0):
        return self.process.denoise(self.net, x, sigma, cond)


PROCESS = EDMProcess(sigma_min=EPS, sigma_max=80.0)
GROUP = OptimizerGroup("student", ("student",), lr=1e-4)
B = 64


def _data(seed: int = 0) -> torch.Tensor:
    return MU + S * torch.randn(B, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def _step(seed: int = 7, progress: float = 0.0) -> StepInfo:
    return StepInfo(step=0, nimg=0, total_nimg=100, phase="main", phase_progress=progress, progress=progress,
                    generator=torch.Generator().manual_seed(seed), local_batch=B, global_batch=B)


def _loss(method, student_mu: float, monkeypatch=None, seed: int = 7, progress: float = 0.0):
    teacher = GaussTeacher(PROCESS, AnalyticEDMNet(gauss_denoiser))
    nets = Nets(teacher, AnalyticEDMNet(student_denoiser(student_mu)))
    ctx = SimpleNamespace(method=method)
    out = cm.fewstep_loss(ctx=ctx, group=GROUP, batch=Batch(x0=_data(), cond=Cond()), nets=nets,
                          step=_step(seed, progress))
    return out.loss


def _capture_distance(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = cm.distance

    def spy(a, b, *args, **kwargs):
        seen.append((a.detach().clone(), b.detach().clone()))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(cm, "distance", spy)
    return seen


CD = cm.CDConfig(num_scales=18, solver="heun", sigma_min=EPS, sigma_max=80.0)


def test_analytic_networks_reproduce_their_targets():
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64) * 3
    sigma = torch.tensor([0.01, 0.3, 2.0, 60.0], dtype=torch.float64)
    teacher = GaussTeacher(PROCESS, AnalyticEDMNet(gauss_denoiser))
    torch.testing.assert_close(teacher.denoise(x, sigma), gauss_denoiser(x, _bcast(sigma, x)))
    f = cm.consistency_fn(AnalyticEDMNet(student_denoiser(MU)), PROCESS, CD, x, sigma, Cond())
    torch.testing.assert_close(f, gauss_consistency(x, _bcast(sigma, x)))


def _heun_by_hand(x, s_hi, s_lo):
    d = (x - gauss_denoiser(x, s_hi)) / s_hi
    x_euler = x + (s_lo - s_hi) * d
    d_next = (x_euler - gauss_denoiser(x_euler, s_lo)) / s_lo
    return x + (s_lo - s_hi) * 0.5 * (d + d_next)


def test_cd_loss_compares_the_exact_map_across_a_heun_step(monkeypatch):
    seen = _capture_distance(monkeypatch)
    loss = _loss(CD, MU)
    assert loss.shape == (B,)
    online, target = seen[0]
    # Recompute the draws from an identically seeded StepInfo, in float64.
    step = _step()
    x0 = _data().double()
    z = step.randn_like(x0)
    grid = karras_sigmas(18, EPS, 80.0).double()
    n = step.randint(0, grid.numel() - 1)
    s_hi, s_lo = _bcast(grid[n], x0), _bcast(grid[n + 1], x0)
    x_hi = x0 + s_hi * z
    torch.testing.assert_close(online.double(), gauss_consistency(x_hi, s_hi), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.double(), gauss_consistency(_heun_by_hand(x_hi, s_hi, s_lo), s_lo),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach().double(), (online - target).double().square().flatten(1).mean(1))


def test_cd_loss_of_the_exact_map_is_only_discretisation_error():
    """With the exact teacher and the exact consistency map f*, the CD loss is the Heun step's error
    alone: small next to a student with a wrong mean, and falling like h^4 relative to it (the Heun
    error is O(h^3) in x, the perturbed student's loss O(h) in x)."""
    ratios, euler_ratios = {}, {}
    for n in (18, 200):
        heun = cm.CDConfig(num_scales=n, solver="heun", sigma_min=EPS, sigma_max=80.0)
        euler = cm.CDConfig(num_scales=n, solver="euler", sigma_min=EPS, sigma_max=80.0)
        perturbed = _loss(heun, MU + 0.2).detach()
        assert (perturbed > 0).all()
        ratios[n] = float(_loss(heun, MU).detach().mean() / perturbed.mean())
        euler_ratios[n] = float(_loss(euler, MU).detach().mean() / perturbed.mean())
    assert ratios[18] < 0.05  # 0.028: 18 Karras levels are coarse around sigma ~ s
    assert ratios[200] < 1e-4  # 1.4e-6
    assert ratios[200] < ratios[18] / 1000
    assert all(ratios[n] < euler_ratios[n] / 5 for n in ratios)


def test_ct_target_is_the_one_sample_estimate(monkeypatch):
    seen = _capture_distance(monkeypatch)
    ct = cm.CTConfig(s0=2, s1=150, sigma_min=EPS, sigma_max=80.0)
    progress = 0.5
    loss = _loss(ct, MU, progress=progress)
    online, target = seen[0]
    step = _step(progress=progress)
    x0 = _data()
    z = step.randn_like(x0)
    grid = karras_sigmas(cm.ct_num_scales(progress, 2, 150), EPS, 80.0)
    assert grid.numel() == 107
    n = step.randint(0, grid.numel() - 1)
    s_hi, s_lo = _bcast(grid[n], x0), _bcast(grid[n + 1], x0)
    torch.testing.assert_close(online, gauss_consistency(x0 + s_hi * z, s_hi), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target, gauss_consistency(x0 + s_lo * z, s_lo), rtol=1e-5, atol=1e-5)
    # Not zero in general: x0 + s_lo z is not on the PF-ODE trajectory through x0 + s_hi z.
    assert float(loss.detach().mean()) > 0


def test_teacher_step_follows_the_closed_form_pf_ode():
    teacher = GaussTeacher(PROCESS, AnalyticEDMNet(gauss_denoiser))
    grid = karras_sigmas(18, EPS, 80.0).double()
    s_hi, s_lo = grid[:-1], grid[1:]  # every adjacent pair of the CD grid, one per sample
    g = torch.Generator().manual_seed(1)
    x_hi = MU + torch.sqrt(S**2 + s_hi**2).view(-1, 1, 1, 1) * torch.randn(17, 1, 4, 4, generator=g,
                                                                          dtype=torch.float64)
    exact = MU + (x_hi - MU) * (torch.sqrt(S**2 + s_lo**2) / torch.sqrt(S**2 + s_hi**2)).view(-1, 1, 1, 1)
    batch = Batch(x0=None, cond=Cond())
    heun = cm.teacher_step(teacher, CD, batch, x_hi, s_hi, s_lo, None)
    euler = cm.teacher_step(teacher, cm.CDConfig(num_scales=18, solver="euler"), batch, x_hi, s_hi, s_lo, None)
    scale = (x_hi - MU).abs().flatten(1).amax(1) * (s_hi - s_lo) / s_hi  # size of the step
    heun_err = (heun - exact).abs().flatten(1).amax(1) / scale
    euler_err = (euler - exact).abs().flatten(1).amax(1) / scale
    assert float(heun_err.max()) < 5e-2  # 0.028 at the coarsest step
    assert (heun_err < euler_err).all()
    # Second order: halving the step shrinks the one-step error about 4x (two half steps: 2 (h/2)^3).
    mid = torch.sqrt(s_hi * s_lo)
    two = cm.teacher_step(teacher, CD, batch, cm.teacher_step(teacher, CD, batch, x_hi, s_hi, mid, None), mid, s_lo,
                          None)
    big, small = (heun - exact).abs().sum(), (two - exact).abs().sum()
    assert 2.5 < float(big / small) < 6


# ---------------------------------------------------------------------------------------------
# LCM-style guided student


def test_guided_student_has_w_and_starts_as_the_teacher(tmp_path):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "c", "unet", conditioning="class"))
    ctx = SimpleNamespace(method=cm.CDConfig(guidance=(2.0, 14.0)))
    student = cm.fewstep_build_student(ctx=ctx, teacher=teacher)
    assert "w" in student.extra_scalars
    assert student is not teacher.net and all(p.requires_grad for p in student.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    cond = Cond(labels=torch.tensor([0, 3, 10]))
    with torch.no_grad():
        ref = teacher.net(x, t, cond)
        for w in (torch.zeros(3), torch.tensor([2.0, 7.5, 14.0]) * GUIDANCE_EMBED_SCALE):
            torch.testing.assert_close(student(x, t, cond, w=w), ref, rtol=0, atol=1e-6)


def test_guided_student_needs_a_conditional_teacher(tmp_path):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "u", "unet"))
    ctx = SimpleNamespace(method=cm.CDConfig(guidance=(2.0, 14.0)))
    with pytest.raises(ValueError, match="conditional"):
        cm.fewstep_build_student(ctx=ctx, teacher=teacher)


def test_teacher_substeps_solve_on_the_finer_karras_grid_and_cut_the_error():
    """substeps = 2 on the 6-point grid is Heun on the 11-point Karras grid (every other point is an interval
    end), closer to the exact PF-ODE flow than one Heun step per interval."""
    teacher = GaussTeacher(PROCESS, AnalyticEDMNet(gauss_denoiser))
    coarse, fine = karras_sigmas(6, EPS, 80.0).double(), karras_sigmas(11, EPS, 80.0).double()
    s_hi, s_lo = coarse[:-1], coarse[1:]
    g = torch.Generator().manual_seed(2)
    x_hi = MU + torch.sqrt(S**2 + s_hi**2).view(-1, 1, 1, 1) * torch.randn(5, 1, 4, 4, generator=g,
                                                                         dtype=torch.float64)
    exact = MU + (x_hi - MU) * (torch.sqrt(S**2 + s_lo**2) / torch.sqrt(S**2 + s_hi**2)).view(-1, 1, 1, 1)
    batch = Batch(x0=None, cond=Cond())
    one = cm.CDConfig(num_scales=6, solver="heun", sigma_min=EPS, sigma_max=80.0)
    two = one.model_copy(update={"substeps": 2})
    by_hand = cm.teacher_step(teacher, one, batch, cm.teacher_step(teacher, one, batch, x_hi, fine[0:-1:2],
                                                                   fine[1::2], None), fine[1::2], fine[2::2], None)
    substepped = cm.teacher_step(teacher, two, batch, x_hi, s_hi, s_lo, None)
    torch.testing.assert_close(substepped, by_hand, rtol=1e-6, atol=1e-6)  # karras_sigmas rounds to float32
    err_one = (cm.teacher_step(teacher, one, batch, x_hi, s_hi, s_lo, None) - exact).abs().max()
    assert float((substepped - exact).abs().max()) < float(err_one) / 2
