"""pcm plugin (Phased Consistency Models, arXiv 2405.18407): conformance on UNet and DiT teachers (CFG range,
adversarial consistency loss), the phase edges against the official ones, and the per-phase targets and the
sampler on a Gaussian problem whose ODE solution is known exactly."""

from __future__ import annotations

import pytest
import torch
from fewstep_plugins import pcm

from fewstep.diffusion import VPProcess, sample_ode
from fewstep.testing import MethodConformance

# ---------------------------------------------------------------------------------------------
# Conformance


class TestPCMConformance(MethodConformance):
    method = {"name": "pcm", "solver_steps": 8}
    backbones = ("unet",)


class TestPCMGuidedDiTConformance(MethodConformance):
    """A CFG range on the teacher step of a class-conditional DiT, an EMA target."""

    method = {"name": "pcm", "solver_steps": 8, "guidance": [1.0, 3.0], "target_ema": 0.9}
    backbones = ("dit",)


class TestPCMAdversarialConformance(MethodConformance):
    """The adversarial consistency loss: a discriminator group next to the student."""

    method = {"name": "pcm", "solver_steps": 8, "num_phases": 2, "adv_weight": 0.1}
    backbones = ("unet",)

    # Two optimizer groups make these the slowest conformance runs (~10 s each): the default suite keeps the
    # gradient check, the rest run with -m slow.
    @pytest.mark.slow
    def test_determinism_under_a_seed(self, teacher, tmp_path):
        super().test_determinism_under_a_seed(teacher, tmp_path)

    @pytest.mark.slow
    def test_resume_replays_the_same_losses(self, teacher, tmp_path):
        super().test_resume_replays_the_same_losses(teacher, tmp_path)


# ---------------------------------------------------------------------------------------------
# Edges


def test_edges_are_the_official_ones_on_a_ddpm_teacher():
    """N = 50, K = 4 on a 1000-step DDPM teacher: PCM's edges are the DDIM timesteps 739, 499, 239 (and 0)."""
    assert pcm.edge_indices(50, 4) == [0, 13, 25, 38, 50]
    assert pcm.edge_indices(50, 1) == [0, 50]
    assert pcm.edge_indices(8, 8) == list(range(9))
    process = VPProcess()
    grid = process.sampling_sigmas(50).double()
    timesteps = process.sigma_to_t(grid[[13, 25, 38]])
    torch.testing.assert_close(timesteps, torch.tensor([739.0, 499.0, 239.0], dtype=torch.float64))
    edges = torch.tensor(pcm.edge_indices(50, 4))
    lower, upper = pcm.phase_of(torch.arange(50), edges)
    assert lower.tolist() == [13] * 13 + [25] * 12 + [38] * 13 + [50] * 12
    assert upper.tolist() == [0] * 13 + [13] * 12 + [25] * 13 + [38] * 12


# ---------------------------------------------------------------------------------------------
# Gaussian data x0 ~ N(MU, S²) per pixel, x = x0 + sigma·z: the exact denoiser is affine and the PF-ODE flow is
# phi(x, sigma -> s) = MU + sqrt((S² + s²)/(S² + sigma²))·(x − MU).

MU, S = 0.2, 0.5
PROCESS = VPProcess()
N, K = 50, 4
GRID = PROCESS.sampling_sigmas(N).double()
EDGES = GRID[pcm.edge_indices(N, K)]


def _b(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def phi(x, sigma, s):
    return MU + _b(torch.sqrt((S**2 + s**2) / (S**2 + sigma**2)), x) * (x - MU)


def exact_denoiser(x, sigma):
    """E[x0 | x]: the teacher at convergence (its DDIM steps are not exact: the ODE is curved)."""
    return MU + _b(S**2 / (S**2 + sigma**2), x) * (x - MU)


def phased_denoiser(x, sigma):
    """The exact PCM student: x0_hat such that the DDIM step to the lower edge s of sigma's phase lands on
    phi(x, sigma -> s), i.e. x0_hat = (phi − (s/sigma)·x)/(1 − s/sigma)."""
    below = EDGES[None, :] < sigma[:, None]
    s = torch.where(below, EDGES[None, :], torch.full_like(EDGES[None, :], -1.0)).max(dim=1).values
    ratio = _b(s / sigma, x)
    return (phi(x, sigma, s) - ratio * x) / (1 - ratio)


def _pairs():
    i = torch.arange(N)
    lower, _ = pcm.phase_of(i, torch.tensor(pcm.edge_indices(N, K)))
    hi, lo, edge = GRID[i], GRID[i + 1], GRID[lower]
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(N, 1, 2, 2, generator=g, dtype=torch.float64)
    x_hi = x0 + _b(hi, x0) * torch.randn(N, 1, 2, 2, generator=g, dtype=torch.float64)
    return x_hi, phi(x_hi, hi, lo), hi, lo, edge  # x_lo: the exact teacher ODE step


def test_the_exact_phased_student_satisfies_every_per_phase_target():
    """With an exact ODE step, f(x_hi) = f(x_lo) on every solver interval, those ending on an edge (target x_lo)
    included, and both equal the ODE solution at the phase's edge."""
    x_hi, x_lo, hi, lo, edge = _pairs()
    online, target = pcm.pair_maps(phased_denoiser, phased_denoiser, x_hi, x_lo, hi, lo, edge)
    torch.testing.assert_close(online, phi(x_hi, hi, edge), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(target, online, rtol=1e-9, atol=1e-9)
    # The teacher's own denoiser (the student at step 0) is not a phased consistency function.
    online0, target0 = pcm.pair_maps(exact_denoiser, exact_denoiser, x_hi, x_lo, hi, lo, edge)
    assert float((online0 - target0).abs().max()) > 1e-3


def test_the_k_step_sampler_with_the_exact_student_reproduces_the_ode_endpoint():
    cfg = pcm.PCMConfig(solver_steps=N, num_phases=K)
    levels = torch.tensor(pcm.sample_levels(cfg, PROCESS, K), dtype=torch.float64)
    torch.testing.assert_close(levels, EDGES)
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_top = noise * levels[0]
    exact = phi(x_top, levels[:1].expand(64), torch.zeros(64, dtype=torch.float64))
    out = sample_ode(phased_denoiser, x_top, levels, "ddim")
    torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-9)
    # The teacher's K-step DDIM along the same edges misses it: the phases are what make K steps exact.
    assert float((sample_ode(exact_denoiser, x_top, levels, "ddim") - exact).abs().max()) > 1e-2


def test_fewer_steps_use_trained_edges_and_more_steps_the_teacher_grid():
    """N <= K steps go through edges (every (K // N)-th from the top, then 0); N > K through the teacher's grid."""
    cfg = pcm.PCMConfig(solver_steps=N, num_phases=K)
    assert pcm.sample_levels(cfg, PROCESS, 2) == pytest.approx(EDGES[[0, 2, 4]].tolist())
    assert pcm.sample_levels(cfg, PROCESS, 1) == pytest.approx(EDGES[[0, 4]].tolist())
    assert pcm.sample_levels(cfg, PROCESS, 3) == pytest.approx(EDGES[[0, 1, 2, 4]].tolist())
    assert pcm.sample_levels(cfg, PROCESS, K + 1) == pytest.approx(PROCESS.sampling_sigmas(K + 1).double().tolist())
    with pytest.raises(ValueError, match="num_phases"):
        pcm.PCMConfig(solver_steps=4, num_phases=8)


@pytest.mark.slow  # a tiny stock pipeline per family, ~10 s each
@pytest.mark.parametrize("family", ["sd3", "flux", "sana"])
def test_flow_teachers_export_the_stock_pipeline_with_flow_match_euler(family, tmp_path_factory, tmp_path):
    """The K-step sampler through the edges is Euler in flow time: the family's stock pipeline with
    FlowMatchEulerDiscreteScheduler draws fewstep's images (1, 2 and 4 steps)."""
    from test_export_stock import FAMILY_PIPELINES, assert_stock_matches_fewstep

    from fewstep.testing import run_tiny, tiny_family_teacher, tiny_run_config

    folder, prompts = tiny_family_teacher(family, tmp_path_factory.getbasetemp() / "tiny-families")
    config = tiny_run_config(folder, {"name": "pcm", "solver_steps": 8}, steps=1, batch=2,
                             data={"prompts": str(prompts)}, validation={"steps": [1, 2, 4]})
    trainer, _ = run_tiny(config, tmp_path / "run")
    assert_stock_matches_fewstep(trainer, tmp_path / "run" / "export", FAMILY_PIPELINES[family],
                                 "FlowMatchEulerDiscreteScheduler", [1, 2, 4])
