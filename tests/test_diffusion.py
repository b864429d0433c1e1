"""Closed-form checks of fewstep.diffusion.

Most checks use Gaussian data x0 ~ N(mu, s²) per dimension, for which the sigma-space denoiser
D(x, sigma) = mu + s²/(s² + sigma²)·(x − mu) and the PF-ODE solution, which keeps
(x − mu)/√(s² + sigma²) constant, are known exactly. diffusers is imported here only, as the reference
for the schedules and preconditionings the processes must reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from fewstep.diffusion import (
    EDMProcess,
    FlowProcess,
    NoiseProcess,
    VPProcess,
    append_dims,
    cfg,
    cm_scalings,
    consistency_from_denoiser,
    ddim_step,
    edm_scalings,
    eps_from_x0,
    euler_step,
    heun_step,
    karras_sigmas,
    lcm_scalings,
    lognormal_sigmas,
    process_from_scheduler_config,
    sample_ode,
    score_from_x0,
    velocity_from_x0,
    x0_from_eps,
)

SHAPE = (4, 2, 3, 3)


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test with float64 as torch's default dtype (grids are created in the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def gaussian(s: float = 0.5, seed: int = 0) -> tuple[Tensor, float]:
    """Per-dimension means mu: (1, C, H, W) and a shared data std s."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, *SHAPE[1:], generator=g, dtype=torch.float64), s


def exact_denoiser(mu: Tensor, s: float) -> Callable[[Tensor, Tensor], Tensor]:
    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sig = append_dims(sigma, x.ndim).to(x.dtype)
        return mu.to(x.dtype) + s**2 / (s**2 + sig**2) * (x - mu.to(x.dtype))

    return denoise


def exact_ode(x: Tensor, mu: Tensor, s: float, sigma_from: float, sigma_to: float) -> Tensor:
    return mu + (x - mu) * math.sqrt(s**2 + sigma_to**2) / math.sqrt(s**2 + sigma_from**2)


def randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


PROCESSES: dict[str, Callable[[], NoiseProcess]] = {
    "vp-eps-linear": lambda: VPProcess(),
    "vp-v-scaled": lambda: VPProcess(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    ),
    "vp-sample-cosine": lambda: VPProcess(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
    "edm-eps": lambda: EDMProcess(),
    "edm-v": lambda: EDMProcess(prediction_type="v_prediction", sigma_data=1.0),
    "edm-openai": lambda: EDMProcess(timestep_scale=1000.0),
    "flow": lambda: FlowProcess(),
    "flow-shift3": lambda: FlowProcess(shift=3.0),
}


@pytest.fixture(params=list(PROCESSES))
def process(request: pytest.FixtureRequest) -> NoiseProcess:
    return PROCESSES[request.param]()


def train_times(p: NoiseProcess, n: int = 16) -> Tensor:
    """Process times spread over the whole range of ``p`` (float64)."""
    sigmas = torch.logspace(math.log10(p.sigma_min), math.log10(p.sigma_max), n, dtype=torch.float64)
    return p.sigma_to_t(sigmas)


# --- helpers and conversions ------------------------------------------------------------------


def test_append_dims() -> None:
    assert append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match="target ndim"):
        append_dims(torch.ones(3, 2), 1)


def test_sigma_space_conversions_are_consistent() -> None:
    x, x0, sigma = (
        randn(*SHAPE),
        randn(*SHAPE, seed=2),
        torch.tensor([0.1, 1.0, 3.0, 20.0], dtype=torch.float64),
    )
    eps = eps_from_x0(x, x0, sigma)
    torch.testing.assert_close(x0_from_eps(x, eps, sigma), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(score_from_x0(x, x0, sigma), -eps / append_dims(sigma, 4), rtol=1e-12, atol=0)
    torch.testing.assert_close(velocity_from_x0(x, x0, sigma), eps, rtol=0, atol=0)


def test_karras_endpoints_and_monotone(float64: None) -> None:
    grid = karras_sigmas(18, 0.002, 80.0)
    assert grid.shape == (18,) and grid.dtype == torch.float64
    assert grid[0].item() == pytest.approx(80.0, rel=1e-14) and grid[-1].item() == pytest.approx(
        0.002, rel=1e-12
    )
    assert bool((grid[1:] < grid[:-1]).all())
    # EDM Eq. 5 at an interior index.
    expected = (80 ** (1 / 7) + 5 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert grid[5].item() == pytest.approx(expected, rel=1e-12)
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [pytest.approx(80.0)]


def test_lognormal_sigmas_statistics() -> None:
    sigmas = lognormal_sigmas(20000, -1.2, 1.2, torch.Generator().manual_seed(0))
    assert sigmas.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert sigmas.log().std().item() == pytest.approx(1.2, abs=0.03)


# --- ODE solvers on Gaussian data -----------------------------------------------------------


def test_heun_matches_closed_form(float64: None) -> None:
    mu, s = gaussian()
    x_start = mu + 80.0 * randn(*SHAPE)
    sigmas = torch.cat([karras_sigmas(1000, 0.002, 80.0), torch.zeros(1)])  # last step: Euler to 0
    out = sample_ode(exact_denoiser(mu, s), x_start, sigmas, solver="heun")
    torch.testing.assert_close(out, exact_ode(x_start, mu, s, 80.0, 0.0), rtol=0, atol=1e-4)


def test_heun_converges_second_order(float64: None) -> None:
    mu, s = gaussian()
    x_start = mu + 80.0 * randn(*SHAPE)
    exact = exact_ode(x_start, mu, s, 80.0, 0.002)
    errors = []
    for n in (64, 128, 256):
        out = sample_ode(exact_denoiser(mu, s), x_start, karras_sigmas(n, 0.002, 80.0), solver="heun")
        errors.append((out - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.5 < coarse / fine < 4.6, errors


def test_euler_converges_first_order(float64: None) -> None:
    mu, s = gaussian()
    x_start = mu + 80.0 * randn(*SHAPE)
    exact = exact_ode(x_start, mu, s, 80.0, 0.002)
    errors = []
    for n in (32, 64, 128):
        out = sample_ode(exact_denoiser(mu, s), x_start, karras_sigmas(n, 0.002, 80.0), solver="euler")
        errors.append((out - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.6 < coarse / fine < 2.6, errors


def test_ddim_step_equals_euler_step() -> None:
    x, x0 = randn(*SHAPE), randn(*SHAPE, seed=2)
    sigma, sigma_next = torch.tensor([80.0, 3.0, 0.5, 0.01]), torch.tensor([40.0, 1.0, 0.0, 0.002])
    torch.testing.assert_close(
        ddim_step(x, sigma.double(), sigma_next.double(), x0),
        euler_step(x, sigma.double(), sigma_next.double(), x0),
        rtol=0,
        atol=1e-12,
    )


def test_single_ddim_step_is_exact_for_point_mass() -> None:
    mu, _ = gaussian()
    x_start = mu + 80.0 * randn(*SHAPE)
    out = sample_ode(exact_denoiser(mu, 0.0), x_start, torch.tensor([80.0, 0.0], dtype=torch.float64), "ddim")
    torch.testing.assert_close(out, mu.expand(SHAPE), rtol=0, atol=1e-12)


def test_heun_falls_back_to_euler_per_sample() -> None:
    mu, s = gaussian()
    denoise = exact_denoiser(mu, s)
    x = mu + randn(*SHAPE)
    sigma = torch.full((4,), 2.0, dtype=torch.float64)
    sigma_next = torch.tensor([0.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    out = heun_step(denoise, x, sigma, sigma_next)
    x0 = denoise(x, sigma)
    euler = euler_step(x, sigma, sigma_next, x0)
    d = velocity_from_x0(x, x0, sigma)
    sn_safe = torch.where(sigma_next > 0, sigma_next, sigma)
    d_next = velocity_from_x0(euler, denoise(euler, sn_safe), sn_safe)
    heun = x + append_dims(sigma_next - sigma, 4) * (d + d_next) / 2  # EDM Alg. 1 l. 8
    torch.testing.assert_close(out[[0, 2]], euler[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[[1, 3]], heun[[1, 3]], rtol=0, atol=1e-14)


def test_sample_ode_rejects_bad_arguments() -> None:
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        sample_ode(lambda x, s: x, x, torch.tensor([1.0, 0.0]), solver="rk4")
    with pytest.raises(ValueError, match="at least 2 levels"):
        sample_ode(lambda x, s: x, x, torch.tensor([1.0]))


def test_cfg() -> None:
    cond, uncond = randn(*SHAPE), randn(*SHAPE, seed=2)
    assert torch.equal(cfg(cond, uncond, 1.0), cond)
    assert torch.equal(cfg(cond, uncond, 0.0), uncond)
    scale = torch.tensor([0.0, 1.0, 2.0, 7.5])
    out = cfg(cond, uncond, scale)
    torch.testing.assert_close(out[3], uncond[3] + 7.5 * (cond[3] - uncond[3]), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], cond[1], rtol=0, atol=1e-15)


# --- consistency scalings ---------------------------------------------------------------------


def test_consistency_boundary_is_exact() -> None:
    x, x0 = randn(*SHAPE), randn(*SHAPE, seed=2)
    assert torch.equal(consistency_from_denoiser(x, 0.002, x0, sigma_min=0.002), x)
    c_skip, c_out = cm_scalings(torch.tensor(0.002), 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_consistency_from_edm_denoiser_matches_cm_parameterisation() -> None:
    x, F = randn(*SHAPE), randn(*SHAPE, seed=2)
    sigma = torch.tensor([0.002, 0.1, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_scalings(sigma, 0.5)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt(), rtol=1e-14, atol=0)
    x0 = append_dims(c_skip, 4) * x + append_dims(c_out, 4) * F  # EDM Eq. 7
    cm_skip, cm_out = cm_scalings(sigma, 0.002, 0.5)
    expected = append_dims(cm_skip, 4) * x + append_dims(cm_out, 4) * F  # CM §1
    torch.testing.assert_close(consistency_from_denoiser(x, sigma, x0, 0.002), expected, rtol=0, atol=1e-12)


def test_lcm_scalings_match_diffusers() -> None:
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    c_skip, c_out = lcm_scalings(torch.tensor([0.0, 1.0, 19.0, 999.0], dtype=torch.float64))
    for i, t in enumerate((0, 1, 19, 999)):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-12)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-12, abs=1e-15)


# --- processes: round trips -------------------------------------------------------------------


def test_time_round_trip(process: NoiseProcess) -> None:
    t = train_times(process)
    torch.testing.assert_close(process.sigma_to_t(process.t_to_sigma(t)), t, rtol=1e-10, atol=1e-9)
    sigma = process.t_to_sigma(t)
    torch.testing.assert_close(sigma, process.sigma(t) / process.alpha(t), rtol=1e-12, atol=0)
    assert sigma[0].item() == pytest.approx(process.sigma_min, rel=1e-9)
    assert sigma[-1].item() == pytest.approx(process.sigma_max, rel=1e-9)
    assert bool((sigma[1:] > sigma[:-1]).all())


def test_add_noise_is_sigma_space_noising(process: NoiseProcess) -> None:
    t = train_times(process, n=4)
    x0, eps = randn(*SHAPE), randn(*SHAPE, seed=2)
    x_t = process.add_noise(x0, eps, t)
    expected = x0 + append_dims(process.t_to_sigma(t), 4) * eps
    torch.testing.assert_close(x_t / append_dims(process.alpha(t), 4), expected, rtol=1e-10, atol=1e-10)


def test_output_round_trips(process: NoiseProcess) -> None:
    t = train_times(process, n=4)
    x0, eps = randn(*SHAPE), randn(*SHAPE, seed=2)
    x_t = process.add_noise(x0, eps, t)
    out = process.output_from_x0(x0, x_t, t)
    torch.testing.assert_close(process.x0_from_output(out, x_t, t), x0, rtol=0, atol=1e-9)
    target = process.output_target(x0, eps, t)
    torch.testing.assert_close(target, out, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(process.x0_from_output(target, x_t, t), x0, rtol=0, atol=1e-9)
    assert torch.equal(process.loss_weight(t), torch.ones_like(t))


def test_scheduler_config_round_trip(process: NoiseProcess) -> None:
    clone = process_from_scheduler_config(process.scheduler_config())
    assert type(clone) is type(process) and clone.prediction_type == process.prediction_type
    t = train_times(process)
    torch.testing.assert_close(clone.alpha(t), process.alpha(t), rtol=0, atol=0)
    torch.testing.assert_close(clone.sigma(t), process.sigma(t), rtol=0, atol=0)
    torch.testing.assert_close(clone.model_time(t), process.model_time(t), rtol=0, atol=0)
    assert (clone.sigma_min, clone.sigma_max) == (process.sigma_min, process.sigma_max)
    assert clone.describe() == process.describe()


def test_scheduler_config_loads_in_diffusers(process: NoiseProcess) -> None:
    import diffusers

    cfg_dict = process.scheduler_config()
    sched = getattr(diffusers, cfg_dict["_class_name"]).from_config(cfg_dict)
    # diffusers keeps only its own keys; fewstep's underscore keys travel in scheduler_config.json itself
    ours = {k: v for k, v in cfg_dict.items() if k.startswith("_fewstep")}
    assert process_from_scheduler_config({**sched.config, **ours}).describe() == process.describe()


def test_edm_openai_timestep_convention() -> None:
    """1000·¼·ln sigma: the timestep diffusers' CMStochasticIterativeScheduler feeds its UNet."""
    from diffusers import CMStochasticIterativeScheduler

    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    expected = torch.from_numpy(CMStochasticIterativeScheduler().sigma_to_t(sigma.numpy()))
    torch.testing.assert_close(EDMProcess(timestep_scale=1000.0).model_time(sigma), expected)
    torch.testing.assert_close(EDMProcess().model_time(sigma), expected / 1000)


def test_sample_train_t(process: NoiseProcess) -> None:
    t = process.sample_train_t(512, torch.Generator().manual_seed(0))
    again = process.sample_train_t(512, torch.Generator().manual_seed(0))
    assert t.shape == (512,) and t.device.type == "cpu" and torch.equal(t, again)
    sigma = process.t_to_sigma(t.double())
    assert bool(torch.isfinite(sigma).all()) and bool((sigma > 0).all())
    if isinstance(process, VPProcess):
        assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= process.num_train_timesteps - 1
    if isinstance(process, FlowProcess):
        assert t.min() >= process.t_min and t.max() <= process.t_max


def test_sampling_sigmas_shape(process: NoiseProcess) -> None:
    sigmas = process.sampling_sigmas(8)
    assert sigmas.shape == (9,) and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert sigmas[0].item() == pytest.approx(process.sigma_max, rel=1e-6)


# --- processes: the denoiser through an analytic network ---------------------------------------


def analytic_net(p: NoiseProcess, mu: Tensor, s: float) -> Callable[..., Tensor]:
    """The exact raw output, computed only from what a real network sees (its input and timestep),
    with each process's formulas written out independently of the module under test."""
    denoise = exact_denoiser(mu, s)

    def net(inp: Tensor, timestep: Tensor, cond: object = None, **scalars: Tensor) -> Tensor:
        assert cond == "cond" and set(scalars) == {"guidance"}
        return raw_output(inp, timestep).to(inp.dtype)  # a real network answers in its input's dtype

    def raw_output(inp: Tensor, timestep: Tensor) -> Tensor:
        if isinstance(p, VPProcess):
            ac = append_dims(p.alphas_cumprod[timestep.round().long()], 4)
            a, sd = ac.sqrt(), (1 - ac).sqrt()
            x0 = denoise(inp / a, (sd / a).flatten())
            eps = (inp - a * x0) / sd
            return {"epsilon": eps, "v_prediction": a * eps - sd * x0, "sample": x0}[p.prediction_type]
        if isinstance(p, EDMProcess):
            sigma = torch.exp(4 * timestep / p.timestep_scale)  # timestep = scale·¼·ln sigma
            sig, sd = append_dims(sigma, 4), p.sigma_data
            x = inp * (sig**2 + sd**2).sqrt()
            c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / (sig**2 + sd**2).sqrt()
            if p.prediction_type == "v_prediction":
                c_out = -c_out
            return (denoise(x, sigma) - c_skip * x) / c_out
        t = append_dims(timestep / 1000, 4)
        x = inp / (1 - t)
        sigma = t / (1 - t)
        x0 = denoise(x, sigma.flatten())
        return (x - x0) / sigma - x0  # eps − x0

    return net


def test_denoise_through_analytic_network(process: NoiseProcess) -> None:
    mu, s = gaussian(s=0.7)
    if isinstance(process, VPProcess):  # integer timesteps, where the analytic net reads alphas_cumprod
        t = torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64)
    else:
        t = train_times(process, n=4)
    sigma = process.t_to_sigma(t)
    x = mu + append_dims(sigma, 4) * randn(*SHAPE)
    out = process.denoise(analytic_net(process, mu, s), x, sigma, "cond", guidance=torch.ones(4))
    torch.testing.assert_close(out, exact_denoiser(mu, s)(x, sigma), rtol=1e-7, atol=1e-7)


def test_denoise_keeps_float32(process: NoiseProcess) -> None:
    mu, s = gaussian()
    x = (mu + randn(*SHAPE)).float()
    net = analytic_net(process, mu.float(), s)
    # VP: a level at an integer timestep, where the analytic net reads alphas_cumprod.
    sigma = process.t_to_sigma(torch.tensor(500.0)).item() if isinstance(process, VPProcess) else 1.0
    out = process.denoise(net, x, torch.tensor(sigma, dtype=torch.float64), "cond", guidance=torch.ones(4))
    assert out.dtype == torch.float32
    expected = exact_denoiser(mu.float(), s)(x, torch.full((4,), sigma))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# --- VP against diffusers -----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_alphas_cumprod_match_diffusers(schedule: str) -> None:
    from diffusers import DDPMScheduler

    p, ref = VPProcess(beta_schedule=schedule), DDPMScheduler(beta_schedule=schedule)
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(p.alpha(t) ** 2, ref.alphas_cumprod.double(), rtol=5e-5, atol=0)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)
    frac = torch.linspace(0, 999, 5001, dtype=torch.float64)
    assert bool((p.t_to_sigma(frac).diff() > 0).all())


@pytest.mark.parametrize("num_steps", [1, 3, 4, 50])
def test_vp_sampling_sigmas_are_ddim_trailing(num_steps: int, float64: None) -> None:
    from diffusers import DDIMScheduler

    p = VPProcess()
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(num_steps)
    ac = p.alphas_cumprod[ref.timesteps]
    expected = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)])
    torch.testing.assert_close(p.sampling_sigmas(num_steps), expected, rtol=1e-12, atol=0)


def test_vp_ddim_sampling_matches_diffusers(float64: None) -> None:
    from diffusers import DDIMScheduler

    mu, s = gaussian()
    p = VPProcess()
    net = analytic_net(p, mu, s)
    ref = DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(10)
    x_t = randn(*SHAPE)
    x_ref = x_t
    for t in ref.timesteps:
        eps = net(x_ref, t.expand(SHAPE[0]).double(), "cond", guidance=torch.ones(1))
        x_ref = ref.step(eps, t, x_ref).prev_sample

    sigmas = p.sampling_sigmas(10)
    x = x_t / p.alpha(p.sigma_to_t(sigmas[:1]))
    out = sample_ode(lambda x, sig: p.denoise(net, x, sig, "cond", guidance=torch.ones(1)), x, sigmas, "ddim")
    torch.testing.assert_close(out, x_ref, rtol=1e-4, atol=1e-4)


# --- flow against diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_flow_sampling_sigmas_match_diffusers(shift: float, num_steps: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    p = FlowProcess(shift=shift)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(num_steps)
    t = ref.sigmas.double().clone()
    assert t[0].item() == 1.0
    t[0] = p.t_max
    expected = torch.cat([t[:-1] / (1 - t[:-1]), t[-1:]])
    torch.testing.assert_close(p.sampling_sigmas(num_steps).double(), expected, rtol=1e-5, atol=0)


def test_flow_euler_sampling_matches_diffusers(float64: None) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu, s = gaussian()
    p = FlowProcess(shift=3.0)
    net = analytic_net(p, mu, s)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(8)
    ref.sigmas[0] = p.t_max
    ref.timesteps[0] = p.t_max * 1000
    x_t = randn(*SHAPE)
    x_ref = x_t
    for t in ref.timesteps:
        v = net(x_ref, t.expand(SHAPE[0]).double(), "cond", guidance=torch.ones(1))
        x_ref = ref.step(v, t, x_ref).prev_sample.double()

    sigmas = p.sampling_sigmas(8)
    x = x_t / (1 - p.t_max)
    out = sample_ode(
        lambda x, sig: p.denoise(net, x, sig, "cond", guidance=torch.ones(1)), x, sigmas, "euler"
    )
    torch.testing.assert_close(out, x_ref, rtol=1e-4, atol=1e-4)


# --- EDM against diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_preconditioning_matches_diffusers(prediction_type: str) -> None:
    from diffusers import EDMEulerScheduler

    p = EDMProcess(prediction_type=prediction_type)
    ref = EDMEulerScheduler(prediction_type=prediction_type)
    x, F = randn(*SHAPE), randn(*SHAPE, seed=2)
    for sigma in (0.002, 0.3, 5.0, 80.0):
        t = torch.full((SHAPE[0],), sigma, dtype=torch.float64)
        expected = ref.precondition_outputs(x, F, torch.tensor(sigma, dtype=torch.float64))
        torch.testing.assert_close(p.x0_from_output(F, x, t), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.model_time(t), ref.precondition_noise(t), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(
            append_dims(p.c_in(t), 4) * x, ref.precondition_inputs(x, append_dims(t, 4)), rtol=1e-12, atol=0
        )


def test_edm_sampling_sigmas_are_karras(float64: None) -> None:
    p = EDMProcess(sigma_min=0.01, sigma_max=50.0, rho=5.0)
    torch.testing.assert_close(p.sampling_sigmas(6)[:-1], karras_sigmas(6, 0.01, 50.0, 5.0), rtol=0, atol=0)


# --- diffusers configs ----------------------------------------------------------------------------


def test_process_from_real_diffusers_configs() -> None:
    from diffusers import (
        EDMDPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    def as_json(sched: object) -> dict:
        return {"_class_name": type(sched).__name__, **sched.config}  # as in scheduler_config.json

    sdxl_like = as_json(
        EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
        )
    )
    p = process_from_scheduler_config(sdxl_like)
    assert (
        isinstance(p, VPProcess)
        and p.prediction_type == "v_prediction"
        and p.beta_schedule == "scaled_linear"
    )
    # Missing keys take the class's own diffusers defaults (LCM: scaled_linear 0.00085 -> 0.012).
    lcm = process_from_scheduler_config({"_class_name": "LCMScheduler"})
    assert isinstance(lcm, VPProcess) and (lcm.beta_start, lcm.beta_end) == (0.00085, 0.012)
    edm = process_from_scheduler_config(as_json(EDMDPMSolverMultistepScheduler(sigma_data=1.0)))
    assert isinstance(edm, EDMProcess) and edm.sigma_data == 1.0
    flow = process_from_scheduler_config(as_json(FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert isinstance(flow, FlowProcess) and flow.shift == 3.0


def test_process_from_scheduler_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown scheduler class 'KarrasVeScheduler'.*Supported: VP"):
        process_from_scheduler_config({"_class_name": "KarrasVeScheduler"})
    with pytest.raises(ValueError, match="use_dynamic_shifting=True is not supported"):
        process_from_scheduler_config(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}
        )
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        process_from_scheduler_config({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True})
    with pytest.raises(
        ValueError, match="DPMSolverMultistepScheduler config.*'flow_prediction' is not supported"
    ):
        process_from_scheduler_config(
            {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction"}
        )
    with pytest.raises(ValueError, match="EDMEulerScheduler config.*'sample' is not supported"):
        process_from_scheduler_config({"_class_name": "EDMEulerScheduler", "prediction_type": "sample"})
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        process_from_scheduler_config({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"})
