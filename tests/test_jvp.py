"""fewstep.jvp: exact (forward-mode) and finite-difference JVPs through the three diffusers backbones,
against a float64 forward-mode reference, and against closed forms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fewstep.backbones import Backbone
from fewstep.jvp import forward_ad_ready, jvp, module_in_dtype, window_steps
from fewstep.testing import tiny_dit, tiny_unet, tiny_unet_condition
from fewstep.types import Cond

B = 4


def _backbone(kind: str) -> tuple[Backbone, Cond | None]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if kind == "unet":
        return Backbone(tiny_unet()).eval(), None
    if kind == "unet_condition":
        return Backbone(tiny_unet_condition()).eval(), Cond(embeddings=torch.randn(B, 16, 32, generator=g))
    return Backbone(tiny_dit()).eval(), Cond(labels=torch.arange(B))


def _inputs() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    x, vx = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
    t = torch.tensor([10.0, 250.0, 600.0, 990.0])
    return (x, t), (vx, torch.full((B,), 30.0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", ["unet", "unet_condition", "dit"])
def test_exact_and_finite_difference_agree_with_a_float64_reference(kind):
    net, cond = _backbone(kind)
    primals, tangents = _inputs()
    net64 = copy.deepcopy(net).double()
    cond64 = None if cond is None else Cond(labels=cond.labels,
                                            embeddings=None if cond.embeddings is None else cond.embeddings.double())
    with torch.no_grad():
        out, exact = jvp(lambda x, t: net(x, t, cond), primals, tangents)
        _, ref = jvp(lambda x, t: net64(x, t, cond64), [p.double() for p in primals], [v.double() for v in tangents])
        call64 = module_in_dtype(net)
        out_fd, fd = jvp(lambda x, t: call64(x, t, cond), primals, tangents, mode="finite_difference")
        plain = net(*primals, cond)
    # Measured: exact float32 within 1.2e-6 of the float64 reference on all three backbones; the finite
    # difference within 1.5e-3, limited by diffusers' float32 timestep features (see fewstep/jvp.py).
    assert _rel(exact, ref) < 1e-5
    assert _rel(fd, ref) < 5e-3
    assert _rel(fd, exact) < 5e-3
    assert ref.abs().max() > 0.1  # a real derivative, not a vanishing one
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)  # the primal is the plain forward
    torch.testing.assert_close(out_fd.float(), plain, rtol=1e-5, atol=1e-5)
    assert exact.dtype == torch.float32 and fd.dtype == torch.float64


def test_closed_form_in_both_modes():
    """f(x, t) = sin(t)·x² has J·(v, u) = 2 sin(t)·x·v + cos(t)·x²·u."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    t, u = torch.rand(3, 1, generator=g, dtype=torch.float64), torch.randn(3, 1, generator=g, dtype=torch.float64)
    expected = 2 * torch.sin(t) * x * v + torch.cos(t) * x**2 * u

    def f(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return torch.sin(t_) * x_**2

    out, exact = jvp(f, (x, t), (v, u))
    _, fd = jvp(f, (x, t), (v, u), mode="finite_difference", step=1e-5)
    torch.testing.assert_close(out, f(x, t))
    torch.testing.assert_close(exact, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fd, expected, rtol=1e-8, atol=1e-8)  # float64 central difference: O(h²)


def test_per_sample_steps_and_time_windows():
    """Per-sample steps (B,) along each sample's tangent; window_steps moves a time map by ±window exactly."""
    from fewstep.diffusion import VPProcess

    x = torch.linspace(0.1, 2.0, 6, dtype=torch.float64).reshape(3, 2)
    v = torch.ones_like(x)
    steps = torch.tensor([1e-6, 1e-3, 0.1], dtype=torch.float64)
    _, d = jvp(torch.exp, (x,), (v,), mode="finite_difference", step=steps)
    # central difference of exp: exp(x)·sinh(h)/h, per sample
    expected = torch.exp(x) * (torch.sinh(steps) / steps)[:, None]
    torch.testing.assert_close(d, expected, rtol=1e-9, atol=0)

    process = VPProcess()
    t = torch.tensor([5.0, 200.3, 990.6], dtype=torch.float64)  # timesteps (off the knots), through sigma and back

    def model_time(tau: torch.Tensor) -> torch.Tensor:
        return process.sigma_to_t(process.t_to_sigma(tau)) ** 2 / 1000  # a nonlinear timestep map

    rate = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    h = window_steps(model_time, t, 3.0, rate=rate, bounds=(0.0, 1000.0))
    moved = model_time(t + h * rate) - model_time(t - h * rate)
    torch.testing.assert_close(moved[1:], torch.full((2,), 6.0, dtype=torch.float64), rtol=1e-3, atol=0)
    # near the lower bound the step is capped: t - h·rate stays at half the distance to 0
    assert float(t[0] - h[0] * rate[0]) == pytest.approx(2.5)


def test_finite_difference_runs_in_float64_and_zero_tangent():
    seen: list[torch.dtype] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return x**3

    x = torch.linspace(-1, 1, 7)
    out, d = jvp(f, (x,), (torch.ones_like(x),), mode="finite_difference")
    assert seen == [torch.float32, torch.float64, torch.float64]
    torch.testing.assert_close(d, 3 * x**2, rtol=1e-5, atol=1e-5)
    _, zero = jvp(f, (x,), (torch.zeros_like(x),), mode="finite_difference")
    assert torch.equal(zero, torch.zeros_like(x))


def test_module_in_dtype_leaves_the_module_alone():
    lin = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    call = module_in_dtype(lin)
    out = call(torch.randn(4, 3, dtype=torch.float64))
    assert out.dtype == torch.float64 and lin.weight.dtype == torch.float32
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])


def test_forward_ad_ready_is_undone_also_on_error():
    from torch.nn.modules import module as module_mod

    def kernels() -> tuple[bool, bool]:
        return torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()

    hooks_before, kernels_before = len(module_mod._global_forward_pre_hooks), kernels()
    with pytest.raises(RuntimeError, match="boom"), forward_ad_ready():
        assert len(module_mod._global_forward_pre_hooks) == hooks_before + 1
        assert kernels() == (False, True)  # only the math attention kernel
        raise RuntimeError("boom")
    assert len(module_mod._global_forward_pre_hooks) == hooks_before
    assert kernels() == kernels_before


def test_bad_arguments_are_explained():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="mode"):
        jvp(torch.sin, (x,), (x,), mode="complex_step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one tangent per primal"):
        jvp(torch.sin, (x,), (x, x))
    with pytest.raises(ValueError, match="same shape"):
        jvp(torch.sin, (x,), (torch.zeros(3),))
