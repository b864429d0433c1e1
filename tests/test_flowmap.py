"""flowmap plugin (Align Your Flow, consistency.md §9): conformance on the three backbones, and its maths
against a Gaussian data distribution whose teacher velocity and flow map are known exactly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fewstep_plugins import flowmap
from torch import nn

from fewstep.backbones import guidance_inputs
from fewstep.diffusion import FlowProcess, sample_ode
from fewstep.sampling import generate
from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_run_config

# ---------------------------------------------------------------------------------------------
# Conformance


class TestEMDConformance(MethodConformance):
    method = {"name": "flowmap", "warmup_nimg": 8}


class TestEMDGuidedConformance(MethodConformance):
    """lambda ~ U[1, 3] fed to the student, CFG on the teacher velocity, gamma-sampling, the exact JVP."""

    method = {"name": "flowmap", "guidance": [1.0, 3.0], "gamma": 0.5, "jvp": "exact"}
    backbones = ("dit",)


class TestLMDConformance(MethodConformance):
    method = {"name": "flowmap", "objective": "lmd", "time_sampling": "sorted", "jvp": "finite_difference"}
    backbones = ("unet",)
    teacher_options = {"process": "edm"}


def test_autoguided_teacher_needs_no_null_condition(tmp_path):
    """§9.5: an unconditional teacher guided by a weaker checkpoint of itself; refused without one."""
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    weak = make_tiny_teacher(tmp_path / "weak", "unet", seed=1)
    method = {"name": "flowmap", "guidance": [1.0, 2.0]}
    with pytest.raises(ValueError, match="teacher.autoguidance"):
        run_tiny(tiny_run_config(teacher, method, steps=1), tmp_path / "cfg")
    trainer, rec = run_tiny(tiny_run_config(teacher, method, steps=2, teacher={"autoguidance": str(weak)}),
                            tmp_path / "auto")
    assert trainer.nets.teacher.autoguided
    assert trainer.nets.student.extra_scalars == ("s", "w")
    assert all(math.isfinite(log["student/loss"]) for log in rec.logs)


def test_sample_guidance_per_step_count_gives_each_sampler_its_scale(tmp_path, monkeypatch):
    """``sample_guidance: {1: 2.5, 4: 1.5}``: the 1- and 4-step samplers feed the student those scales, a step
    count the dict lacks the middle of the training range; a float serves every step count."""
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    weak = make_tiny_teacher(tmp_path / "weak", "unet", seed=1)
    config = tiny_run_config(teacher, {"name": "flowmap", "guidance": [1.0, 3.0], "sample_guidance": {1: 2.5, 4: 1.5}},
                             steps=1, teacher={"autoguidance": str(weak)}, validation={"steps": [1]})
    trainer, _ = run_tiny(config, tmp_path / "run")
    seen = []

    def spy(w):
        seen.append(None if w is None else sorted(set(w.tolist())))
        return guidance_inputs(w)

    monkeypatch.setattr(flowmap, "guidance_inputs", spy)
    noise = torch.randn((2, *trainer.nets.teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    for steps in (1, 4, 2):
        generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, None, steps)
    assert seen == [[2.5], [1.5], [2.0]]
    flat = dataclasses.replace(trainer.ctx, method=trainer.ctx.method.model_copy(update={"sample_guidance": 1.25}))
    generate(trainer.pm.hook, flat, trainer.nets, noise, None, 4)
    assert seen[-1] == [1.25]
    with pytest.raises(ValueError, match="sample_guidance"):
        flowmap.FlowMapConfig(guidance=(1.0, 3.0), sample_guidance={0: 2.0})
    with pytest.raises(ValueError, match="sample_guidance"):
        flowmap.FlowMapConfig(guidance=(1.0, 3.0), sample_guidance={1: -1.0})


# ---------------------------------------------------------------------------------------------
# Curriculum and times


def test_warmup_ramps_to_r_max_and_never_reaches_one():
    assert flowmap.tangent_warmup(0, 1000, 0.99) == 0.0
    assert flowmap.tangent_warmup(500, 1000, 0.99) == pytest.approx(0.495)
    assert flowmap.tangent_warmup(1000, 1000, 0.99) == 0.99
    assert flowmap.tangent_warmup(10**9, 1000, 0.99) == 0.99
    assert flowmap.tangent_warmup(0, 0, 0.99) == 0.99


@pytest.mark.parametrize("kind", ["gap", "sorted"])
def test_time_pairs(kind):
    cfg = flowmap.FlowMapConfig(time_sampling=kind)
    ts = flowmap.sample_pair(cfg, 4096, torch.Generator().manual_seed(0))
    t, s = ts[:, 0], ts[:, 1]
    assert ts.shape == (4096, 2) and bool((s <= t).all() and (s >= 0).all() and (t <= 1).all())
    assert float((t - s).min()) < 0.05 and float((t - s).max()) > 0.8  # small and large gaps both occur


def test_endpoint_share_sets_s_to_zero_in_a_fixed_share_of_pairs():
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = flowmap.sample_pair(flowmap.FlowMapConfig(p_std=2.0), 1000, g0)
    mixed = flowmap.sample_pair(flowmap.FlowMapConfig(p_std=2.0, endpoint_share=0.25), 1000, g1)
    ends = mixed[:, 1] == 0
    assert int(ends.sum()) == 250 and int((plain[:, 1] == 0).sum()) == 0
    assert torch.equal(mixed[:, 0], plain[:, 0]) and torch.equal(mixed[~ends], plain[~ends])  # only s changes
    with pytest.raises(ValueError):
        flowmap.FlowMapConfig(endpoint_share=1.5)


def test_default_grid_is_the_teachers_in_flow_time():
    process = FlowProcess()
    assert flowmap.default_sample_times(process, 1) == pytest.approx([process.t_max, 0.0])
    times = flowmap.default_sample_times(process, 4)
    assert len(times) == 5 and times[-1] == 0.0 and all(a > b for a, b in zip(times, times[1:]))


# ---------------------------------------------------------------------------------------------
# On a real backbone: s = t is the identity, and at step 0 the sampler is the teacher's DDIM


@pytest.mark.parametrize("process", ["vp", "edm", "flow"])
def test_identity_at_s_equal_t_and_ddim_at_initialisation(tmp_path, process):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", process=process))
    student = flowmap.fewstep_build_student(ctx=_ctx(), teacher=teacher).eval().double()
    net = teacher.net.double()  # float64: near t_max the flow <-> sigma conversions amplify float32 rounding
    proc = teacher.process
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        F = flowmap.average_velocity(student, proc, x, t, t, None)
        assert torch.equal(flowmap.flow_map(F, x, t, t), x)

        def F_fn(x_, t_, s_):
            return flowmap.average_velocity(student, proc, x_, t_, s_, None)

        for n in (1, 3):
            chained = flowmap.chain(F_fn, x, flowmap.default_sample_times(proc, n))
            sigmas = proc.sampling_sigmas(n).double()
            ddim = sample_ode(lambda x_, sig: proc.denoise(net, x_, sig, None), x * sigmas[0], sigmas, "ddim")
            torch.testing.assert_close(chained, ddim, rtol=1e-7, atol=1e-7)


def _ctx():
    from types import SimpleNamespace

    return SimpleNamespace(method=flowmap.FlowMapConfig(), config=SimpleNamespace(teacher=SimpleNamespace(guidance=1.0)))


# ---------------------------------------------------------------------------------------------
# Gaussian data, x0 ~ N(MU, S²) per pixel: the exact velocity and flow map in flow time
# x_t = (1 − t)·x0 + t·eps have mean m_t = (1 − t)·MU and std std_t = sqrt((1 − t)² S² + t²).

MU, S = 0.3, 0.5


def _m(t):
    return (1 - t) * MU


def _std(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def _b(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def exact_map(x, t, s):
    """f*(x, t, s) = m_s + std_s/std_t·(x − m_t): the PF-ODE flow of an affine (Gaussian) problem."""
    return _b(_m(s), x) + _b(_std(s) / _std(t), x) * (x - _b(_m(t), x))


def exact_velocity(x, t):
    """v*(x, t) = m'_t + std'_t/std_t·(x − m_t), m' = −MU, std' = (t − (1 − t) S²)/std_t."""
    dstd = (t - (1 - t) * S**2) / _std(t)
    return -MU + _b(dstd / _std(t), x) * (x - _b(_m(t), x))


def exact_average_velocity(x, t, s):
    return (exact_map(x, t, s) - x) / _b(s - t, x)


class AnalyticFlowNet(nn.Module):
    """Behaves like a flow-matching backbone (FlowProcess: input x_t, timestep 1000·t, velocity output).

    Its output is read by `flowmap.average_velocity` as F(x, t, s) exactly (for a flow teacher the
    read-out (x_t − x0)/t is the raw output), with s recovered from the ``s`` input (1000·s)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, timestep, cond=None, s=None, **scalars):
        t = timestep / 1000
        return self.fn(x, t, t if s is None else s / 1000) + 0 * self.dummy


PROCESS = FlowProcess()


def _points(n: int = 6):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.15, 0.3, 0.5, 0.7, 0.9, 0.99][:n], dtype=torch.float64)
    s = t * torch.tensor([0.0, 0.5, 0.1, 0.9, 0.3, 0.6][:n], dtype=torch.float64) + 0.002
    x0 = MU + S * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    x = _b(1 - t, x0) * x0 + _b(t, x0) * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, t, s


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_emd_tangent_vanishes_at_the_exact_flow_map(mode):
    x, t, s = _points()
    v = exact_velocity(x, t)
    exact = AnalyticFlowNet(exact_average_velocity)
    F_minus, g = flowmap.emd_tangent(exact, PROCESS, x, t, s, v, None, 1.0, {}, mode=mode, fd_window=1e-3)
    torch.testing.assert_close(F_minus, exact_average_velocity(x, t, s))
    scale = (v - F_minus).flatten(1).norm(dim=1)  # each term alone is far from zero...
    assert float(scale.min()) > 0.05
    tol = 1e-6 if mode == "exact" else 1e-5  # the central difference's O(h²) truncation at step 1e-3
    assert float((g.flatten(1).norm(dim=1) / scale).max()) < tol  # ...their sum df*/dt is zero
    # The teacher-velocity student (the state at step 0: F(x, t, s) = v(x, t)) is not a flow map.
    _, g0 = flowmap.emd_tangent(AnalyticFlowNet(lambda x_, t_, s_: exact_velocity(x_, t_)), PROCESS, x, t, s, v,
                                None, 1.0, {}, mode=mode)
    assert float((g0.flatten(1).norm(dim=1) / scale).min()) > 1e-2


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_lmd_residual_vanishes_at_the_exact_flow_map(mode):
    x, t, s = _points()
    exact = AnalyticFlowNet(exact_average_velocity)
    F_minus, g = flowmap.lmd_tangent(exact, PROCESS, x, t, s, exact_velocity, None, 1.0, {}, mode=mode,
                                     fd_window=1e-3)
    scale = F_minus.flatten(1).norm(dim=1)
    tol = 1e-6 if mode == "exact" else 1e-5  # the central difference's O(h²) truncation at step 1e-3
    assert float((g.flatten(1).norm(dim=1) / scale).max()) < tol


def _chain_error(F_fn, n: int, gamma: float = 0.0) -> float:
    noise = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = flowmap.default_sample_times(PROCESS, n)
    out = flowmap.chain(F_fn, noise, times, gamma, torch.Generator().manual_seed(2))
    t0 = torch.full((512,), times[0], dtype=torch.float64)
    truth = exact_map(times[0] * noise, t0, torch.zeros_like(t0))
    return float((out - truth).abs().max())


def test_multistep_sampling_improves_with_steps_and_the_exact_map_is_exact_in_one():
    teacher_velocity = AnalyticFlowNet(lambda x_, t_, s_: exact_velocity(x_, t_))  # = the student at step 0
    exact = AnalyticFlowNet(exact_average_velocity)

    def F_of(net):
        return lambda x, t, s: flowmap.average_velocity(net, PROCESS, x, t, s, None)

    errors = [_chain_error(F_of(teacher_velocity), n) for n in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # DDIM converges to the ODE solution
    assert errors[0] > 0.05
    for n in (1, 2, 4):
        # The s input is clamped at the teacher's smallest level t_min = 1e-3, so the last jump to 0 is an
        # Euler extrapolation from the map to t_min: an O(t_min) error.
        assert _chain_error(F_of(exact), n) < 5e-3


def test_gamma_sampling_with_the_exact_map_keeps_the_data_distribution():
    exact = AnalyticFlowNet(exact_average_velocity)
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    times = flowmap.default_sample_times(PROCESS, 4)
    out = flowmap.chain(lambda x, t, s: flowmap.average_velocity(exact, PROCESS, x, t, s, None), noise, times, 0.7,
                        torch.Generator().manual_seed(4))
    deterministic = flowmap.chain(lambda x, t, s: flowmap.average_velocity(exact, PROCESS, x, t, s, None), noise,
                                  times)
    assert not torch.allclose(out, deterministic)
    assert float(out.mean()) == pytest.approx(MU, abs=0.02)
    assert float(out.std()) == pytest.approx(S, abs=0.02)


# ---------------------------------------------------------------------------------------------
# EMD training on Gaussian data approaches the exact flow map


class CorrectedVelocity(nn.Module):
    """A flow backbone returning the exact teacher velocity plus a learned, zero-initialised affine
    correction A(t, s)·x + B(t, s): the (t, s) student at step 0 is the teacher, as in a real run."""

    def __init__(self) -> None:
        super().__init__()
        self.corr = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2))
        nn.init.zeros_(self.corr[2].weight)
        nn.init.zeros_(self.corr[2].bias)

    def forward(self, x, timestep, cond=None, s=None):
        t = timestep / 1000
        s = t if s is None else s / 1000
        d = self.corr(torch.stack([t, s], 1).to(x.dtype))
        return exact_velocity(x, t) + d[:, :1] * x + d[:, 1:]


def _chain_errors(net, steps) -> list[float]:
    noise = torch.randn(2048, 16, generator=torch.Generator().manual_seed(5))
    errors = []
    for n in steps:
        times = flowmap.default_sample_times(PROCESS, n)
        out = flowmap.chain(lambda x, t, s: flowmap.average_velocity(net, PROCESS, x, t, s, None), noise, times)
        t0 = torch.full((2048,), times[0])
        errors.append(float((out - exact_map(times[0] * noise, t0, torch.zeros(2048))).abs().mean()))
    return errors


@pytest.mark.parametrize("objective", ["emd", "lmd"])
def test_training_on_gaussian_data_approaches_the_exact_flow_map(objective):
    """The hook's target (``map_target``) trains towards the exact map with either objective; a sign error in
    the target diverges (LMD with F⁻ + ĝ: chain errors 14, 34, 0.9)."""
    torch.manual_seed(0)
    net, cfg = CorrectedVelocity(), flowmap.FlowMapConfig(objective=objective)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    t_min, t_max = flowmap.time_range(PROCESS)
    steps = (1, 4, 8)
    before = _chain_errors(net, steps)  # the teacher's DDIM: 0.40, 0.16, 0.077
    for it in range(500):
        ts = flowmap.sample_pair(cfg, 256, g).clamp(t_min, t_max)
        t, s = ts[:, 0], ts[:, 1]
        x0, eps = MU + S * torch.randn(256, 16, generator=g), torch.randn(256, 16, generator=g)
        x = (1 - t)[:, None] * x0 + t[:, None] * eps
        r = flowmap.tangent_warmup(it, 200, cfg.r_max)
        if objective == "emd":
            F_minus, tangent = flowmap.emd_tangent(net, PROCESS, x, t, s, exact_velocity(x, t), None, r, {})
        else:
            F_minus, tangent = flowmap.lmd_tangent(net, PROCESS, x, t, s, exact_velocity, None, r, {})
        target = flowmap.map_target(objective, F_minus, tangent, cfg.tangent_norm, cfg.tangent_c)
        loss = (flowmap.average_velocity(net, PROCESS, x, t, s, None) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _chain_errors(net, steps)  # measured: EMD 0.035, 0.038, 0.036; LMD 0.091, 0.072, 0.016
    assert all(a < b for a, b in zip(after, before)), (before, after)  # better than DDIM at every step count
    assert after[0] < 0.25 * before[0], (before, after)
