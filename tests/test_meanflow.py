"""meanflow plugin (Mean Flows, arXiv 2505.13447): conformance on UNet and DiT teachers, and its maths on a
Gaussian data distribution, where the instantaneous and the average velocity are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from fewstep_plugins import meanflow
from torch import nn

from fewstep.diffusion import FlowProcess
from fewstep.flowmaps import average_velocity, chain, default_sample_times
from fewstep.testing import (
    MethodConformance,
    assert_ranks_match,
    make_tiny_teacher,
    network_state,
    run_on_ranks,
    run_tiny,
    tiny_run_config,
)

# ---------------------------------------------------------------------------------------------
# Conformance


class TestMeanFlowConformance(MethodConformance):
    """Distillation from the teacher's velocity (the JVP by finite differences on this VP teacher)."""

    method = {"name": "meanflow"}
    backbones = ("unet",)


class TestMeanFlowFromDataConformance(MethodConformance):
    """Training from data (v = eps − x0) from scratch, the exact forward-mode JVP through a DiT."""

    method = {"name": "meanflow", "velocity": "data", "init": "random", "jvp": "exact"}
    backbones = ("dit",)
    teacher_options = {"process": "flow"}


# ---------------------------------------------------------------------------------------------
# Gaussian data, x0 ~ N(MU, S²) per pixel, in flow time z_t = (1 − t)·x0 + t·eps: z_t has mean m_t = (1 − t)·MU
# and std s_t = sqrt((1 − t)² S² + t²); the PF-ODE flow is affine, z_r = m_r + s_r/s_t·(z_t − m_t).

MU, S = 0.3, 0.5
PROCESS = FlowProcess()


def _b(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _m(t):
    return (1 - t) * MU


def _std(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_velocity(x, t):
    """v(z, t) = m'_t + s'_t/s_t·(z − m_t) with m' = −MU, s' = (t − (1 − t) S²)/s_t."""
    return -MU + _b((t - (1 - t) * S**2) / _std(t) ** 2, x) * (x - _b(_m(t), x))


def exact_average_velocity(x, r, t):
    """u(z, r, t) = (z_t − z_r)/(t − r), the displacement of the exact flow over [r, t] divided by its length."""
    z_r = _b(_m(r), x) + _b(_std(r) / _std(t), x) * (x - _b(_m(t), x))
    return (x - z_r) / _b(t - r, x)


class AnalyticFlowNet(nn.Module):
    """A flow-matching backbone (FlowProcess: input z_t, timestep 1000·t, velocity output) whose output,
    read by ``average_velocity``, is fn(z, r, t) exactly, r recovered from the ``s`` input (1000·r)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, timestep, cond=None, s=None):
        t = timestep / 1000
        return self.fn(x, t if s is None else s / 1000, t) + 0 * self.dummy


def _points():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.15, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    r = t * torch.tensor([0.0, 0.5, 0.1, 0.9, 0.3, 0.6], dtype=torch.float64) + 0.002
    x0 = MU + S * torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    x = _b(1 - t, x0) * x0 + _b(t, x0) * torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, t, r


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_the_meanflow_target_at_the_exact_average_velocity_is_itself(mode):
    """u = v − (t − r)·du/dt holds for the exact u (the MeanFlow identity); the student at step 0 (u = v) violates it."""
    x, t, r = _points()
    v = exact_velocity(x, t)
    u_exact = exact_average_velocity(x, r, t)
    with torch.no_grad():
        u, du_dt = meanflow.total_derivative(AnalyticFlowNet(exact_average_velocity), PROCESS, x, t, r, v, None, {},
                                             mode=mode)
    torch.testing.assert_close(u, u_exact)
    target = meanflow.meanflow_target(v, du_dt, t, r)
    scale = (v - u_exact).flatten(1).norm(dim=1)  # the correction term is far from zero...
    assert float(scale.min()) > 0.05
    tol = 1e-7 if mode == "exact" else 1e-5  # the central difference's O(h²) truncation at step 1e-3
    assert float(((target - u_exact).flatten(1).norm(dim=1) / scale).max()) < tol  # ...and exactly right
    with torch.no_grad():
        u0, du0 = meanflow.total_derivative(AnalyticFlowNet(lambda x_, r_, t_: exact_velocity(x_, t_)), PROCESS, x, t,
                                            r, v, None, {}, mode=mode)
    residual = (meanflow.meanflow_target(v, du0, t, r) - u0).flatten(1).norm(dim=1) / scale
    assert float(residual.min()) > 1e-2


def test_total_derivative_through_a_backbone_matches_a_finite_difference(tmp_path):
    """The exact JVP with tangent (v, 0, 1) equals d/dh u(z + h·v, r, t + h) at h = 0 through a real (t, r) UNet
    whose r embedding is not zero (float64 central difference)."""
    from fewstep.teacher import load_teacher

    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", process="flow"))
    ctx = _ctx()
    student = meanflow.fewstep_build_student(ctx=ctx, teacher=teacher).eval().double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    r = torch.tensor([0.0, 0.2, 0.85], dtype=torch.float64)
    proc = teacher.process
    with torch.no_grad():
        u, du_dt = meanflow.total_derivative(student, proc, x, t, r, v, None, {}, mode="exact")
        # h = 0.1 DDPM timestep: diffusers' timestep features are float32 whatever the input, so a smaller h
        # amplifies their rounding, and a larger one meets their ~1-timestep oscillation.
        h = 1e-4
        hi = average_velocity(student, proc, x + h * v, t + h, r, None)
        lo = average_velocity(student, proc, x - h * v, t - h, r, None)
    torch.testing.assert_close(u, average_velocity(student, proc, x, t, r, None))
    fd = (hi - lo) / (2 * h)
    assert float((du_dt - fd).norm() / fd.norm()) < 1e-2
    assert float(du_dt.abs().mean()) > 1e-3


def _ctx(**method):
    from types import SimpleNamespace

    return SimpleNamespace(method=meanflow.MeanFlowConfig(**method),
                           config=SimpleNamespace(teacher=SimpleNamespace(guidance=1.0)))


def test_time_pairs_follow_the_ratio_of_distinct_times():
    ts = meanflow.sample_times(meanflow.MeanFlowConfig(ratio=0.25), 20000, torch.Generator().manual_seed(0))
    t, r = ts[:, 0], ts[:, 1]
    assert bool((r <= t).all() and (r > 0).all() and (t < 1).all())
    assert float((r < t).float().mean()) == pytest.approx(0.25, abs=0.02)
    assert float(meanflow.adaptive_weight(torch.tensor([3.0]), 1.0, 1e-3)) == pytest.approx(1 / 3.001)
    assert float(meanflow.adaptive_weight(torch.tensor([3.0]), 0.0, 1e-3)) == 1.0


def test_one_step_sampling_with_the_exact_average_velocity_is_the_exact_flow():
    """z_0 = z_1 − u(z_1, 0, 1) (MeanFlow's 1-NFE sampler) and its chained form are exact for the exact u; the r input is
    clamped at the teacher's smallest level t_min = 1e-3, an O(t_min) error."""
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = AnalyticFlowNet(exact_average_velocity)
    for n in (1, 2, 4):
        times = default_sample_times(PROCESS, n)
        out = chain(lambda x, t, r: average_velocity(exact, PROCESS, x, t, r, None), noise, times)
        t0 = torch.full((256,), times[0], dtype=torch.float64)
        z0 = _b(_m(torch.zeros_like(t0)), noise) + _b(_std(torch.zeros_like(t0)) / _std(t0), noise) * (
            times[0] * noise - _b(_m(t0), noise))
        assert float((out - z0).abs().max()) < 5e-3


class CorrectedVelocity(nn.Module):
    """The exact instantaneous velocity plus a learned, zero-initialised affine correction A(t, r)·z + B(t, r)."""

    def __init__(self) -> None:
        super().__init__()
        self.corr = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2))
        nn.init.zeros_(self.corr[2].weight)
        nn.init.zeros_(self.corr[2].bias)

    def forward(self, x, timestep, cond=None, s=None):
        t = timestep / 1000
        r = t if s is None else s / 1000
        d = self.corr(torch.stack([t, r], 1).to(x.dtype))
        return exact_velocity(x, t) + d[:, :1] * x + d[:, 1:]


def _one_step_error(net) -> float:
    noise = torch.randn(2048, 16, generator=torch.Generator().manual_seed(5))
    times = default_sample_times(PROCESS, 1)
    out = chain(lambda x, t, r: average_velocity(net, PROCESS, x, t, r, None), noise, times)
    t0 = torch.full((2048,), times[0])
    z0 = MU + (S / _std(t0))[:, None] * (times[0] * noise - _m(t0)[:, None])
    return float((out - z0).abs().mean())


def test_training_from_data_on_gaussian_data_learns_the_one_step_map():
    """The hook's objective with v = eps − x0 (conditional velocities only, as the paper trains) moves the 1-step
    map towards the exact flow; a sign error in the target makes it worse."""
    torch.manual_seed(0)
    net, cfg = CorrectedVelocity(), meanflow.MeanFlowConfig()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    before = _one_step_error(net)  # the teacher's 1-step DDIM: 0.39
    for _ in range(300):
        tr = meanflow.sample_times(cfg, 256, g)
        t, r = tr[:, 0].clamp(1e-3, 1 - 1e-3), tr[:, 1]
        r = torch.minimum(r, t)
        x0, eps = MU + S * torch.randn(256, 16, generator=g), torch.randn(256, 16, generator=g)
        x = (1 - t)[:, None] * x0 + t[:, None] * eps
        v = eps - x0
        with torch.no_grad():
            _, du_dt = meanflow.total_derivative(net, PROCESS, x, t, r, v, None, {})
        target = meanflow.meanflow_target(v, du_dt, t, r)
        squared = (average_velocity(net, PROCESS, x, t, r, None) - target).square().sum(1)
        loss = (meanflow.adaptive_weight(squared, cfg.adaptive_p, cfg.adaptive_c) * squared).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _one_step_error(net)
    assert after < 0.5 * before, (before, after)
    assert math.isfinite(after)


def test_distillation_with_a_guided_teacher_trains(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "dit")
    with pytest.raises(ValueError, match="velocity: data would be ignored"):
        run_tiny(tiny_run_config(teacher, {"name": "meanflow", "velocity": "data"}, steps=1, teacher={"guidance": 2.0}),
                 tmp_path / "refused")
    trainer, rec = run_tiny(tiny_run_config(teacher, {"name": "meanflow"}, steps=2, teacher={"guidance": 2.0}),
                            tmp_path / "run")
    assert trainer.nets.student.extra_scalars == ("s",)
    assert all(math.isfinite(log["student/loss"]) for log in rec.logs)


@pytest.mark.slow  # 15-20 s: two forked ranks
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    """The forward-mode JVP runs through the unwrapped student: 2 gloo ranks must still train like 1 process."""
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")

    def config():
        return tiny_run_config(teacher, {"name": "meanflow", "jvp": "exact"}, steps=3, batch=8,
                               optimizer={"name": "sgd", "lr": 1e-3})

    single, _ = run_tiny(config(), tmp_path / "single")
    ranks = run_on_ranks(config(), tmp_path / "multi", tmp_path / "ranks", ("student",))
    assert_ranks_match(ranks, network_state(single.nets, ("student",)))
    initial = single.nets.teacher.net.state_dict()
    assert any(not torch.equal(ranks[0][f"student.{k}"], v.float()) for k, v in initial.items())


@pytest.mark.slow  # a tiny stock pipeline per family, ~10 s each
@pytest.mark.parametrize(("family", "scheduler"), [("sd", "LCMScheduler"), ("sd3", "FlowMatchLCMScheduler")])
def test_one_step_export_is_the_stock_pipeline(family, scheduler, tmp_path_factory, tmp_path):
    """z_0 = z_1 − u(z_1, 0, 1) is an x0 prediction with r = 0 folded into the student: the family's stock pipeline
    draws fewstep's 1-step images; the multistep sampler (r changes per step) is documented only by fewstep."""
    from test_export_stock import FAMILY_PIPELINES, assert_stock_matches_fewstep

    from fewstep.testing import tiny_family_teacher

    folder, prompts = tiny_family_teacher(family, tmp_path_factory.getbasetemp() / "tiny-families")
    config = tiny_run_config(folder, {"name": "meanflow"}, steps=1, batch=2, data={"prompts": str(prompts)},
                             validation={"steps": [1, 2]})
    trainer, _ = run_tiny(config, tmp_path / "run")
    assert_stock_matches_fewstep(trainer, tmp_path / "run" / "export", FAMILY_PIPELINES[family], scheduler, [1])
