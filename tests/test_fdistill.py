"""fdistill plugin and fewstep.distribution's f-divergence weights: conformance on the UNet and DiT tiny teachers,
h(r) = f''(r)·r² for every divergence (autograd), the weights of a known density ratio (two Gaussians), the
bin normalisation, reverse KL giving DMD's step exactly (in the maths and in a whole training run against
dmd2), and the configuration errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fewstep.distribution import F_DIVERGENCES, Players, Schedule, f_weights, generator_objective
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_run_config
from fewstep.types import StepInfo


class TestFDistillConformance(MethodConformance):
    method = {"name": "fdistill", "ratio": 2}
    backbones = ("unet", "dit")
    steps = 3


def gaussian_denoiser(mean: float, std: float):
    """Exact E[x0 | x0 + sigma eps] for x0 ~ N(mean, std²)."""
    return lambda x, sigma: mean + (std**2 / (std**2 + sigma**2)).view(-1, 1, 1, 1) * (x - mean)


@pytest.mark.parametrize("name", sorted(F_DIVERGENCES))
def test_h_is_f_second_derivative_times_r_squared(name):
    f, h = F_DIVERGENCES[name]
    r = torch.tensor([0.2, 0.7, 1.0, 3.0, 9.0], dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    torch.testing.assert_close(h(r.detach()), d2f * r.detach() ** 2)
    assert abs(float(f(torch.tensor(1.0, dtype=torch.float64)))) < 1e-12, "an f-divergence needs f(1) = 0"
    assert torch.all(d2f > 0), "f must be convex"


def test_weights_at_equal_densities():
    """At r = 1 (generator = teacher) h is 1, 1, 1/2, 1/2, 2, 1/2, 2; normalised, every weight is 1."""
    one = torch.ones(3)
    expected = {"reverse_kl": 1.0, "forward_kl": 1.0, "js": 0.5, "squared_hellinger": 0.5, "jeffreys": 2.0,
                "softened_rkl": 0.5, "neyman_chi2": 2.0}
    for name, value in expected.items():
        torch.testing.assert_close(F_DIVERGENCES[name][1](one), torch.full((3,), value))
        torch.testing.assert_close(f_weights(name, torch.zeros(3)), one)


@pytest.mark.parametrize("name", ["forward_kl", "js", "squared_hellinger", "jeffreys", "softened_rkl", "neyman_chi2"])
def test_weights_of_a_known_density_ratio(name):
    """p = N(1, 1), q = N(0, 1): log r(x) = x − 1/2; with exact logits the weights are h(r)/mean h(r)."""
    x = torch.linspace(-1.5, 2.5, 9, dtype=torch.float64)
    logits = x - 0.5
    r = torch.exp(logits)
    h = F_DIVERGENCES[name][1](r)
    w = f_weights(name, logits.float(), ratio_clip=(1e-3, 1e3))
    torch.testing.assert_close(w, (h / h.mean()).float())
    assert w.mean().item() == pytest.approx(1.0)
    if name in ("forward_kl", "js", "squared_hellinger", "jeffreys"):  # mode covering: heavier where p > q
        assert torch.all(w[1:] > w[:-1])
    else:
        assert torch.all(w[1:] < w[:-1])


def test_ratio_is_clipped_and_normalised_within_its_bin():
    logits = torch.tensor([math.log(50.0), math.log(0.01), math.log(2.0), math.log(4.0)])
    w = f_weights("forward_kl", logits)  # r clipped to [0.1, 20]: 20, 0.1, 2, 4
    r = torch.tensor([20.0, 0.1, 2.0, 4.0])
    torch.testing.assert_close(w, r / r.mean())
    bins = torch.tensor([0, 0, 1, 1])
    w = f_weights("forward_kl", logits, bins=bins, num_bins=2)
    rn = torch.cat([r[:2] / r[:2].mean(), r[2:] / r[2:].mean()])
    torch.testing.assert_close(w, rn / rn.mean())


def step_info(seed: int) -> StepInfo:
    return StepInfo(step=0, nimg=0, total_nimg=100, phase="train", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(seed), local_batch=4, global_batch=4)


@pytest.mark.parametrize("name,equal", [("reverse_kl", True), ("js", False)])
def test_reverse_kl_weighting_is_dmd_exactly(name, equal):
    cfg = SimpleNamespace(backward_simulation=True)
    sched = Schedule(torch.linspace(0.01, 80, 1000), torch.tensor([80.0]), (20, 980), 1000)
    a = torch.tensor(0.8, requires_grad=True)
    p = Players(lambda x, s: a * x / s.view(-1, 1, 1, 1), gaussian_denoiser(0.5, 0.4), gaussian_denoiser(0.0, 0.9))
    logits = lambda x_t, sigma: x_t.flatten(1).mean(1)  # noqa: E731 - any non-constant estimate of log r
    grads = []
    for weight in (None, lambda x_t, s: f_weights(name, logits(x_t, s))):
        a.grad = None
        loss, _ = generator_objective(cfg, sched, p, (1, 4, 4), step_info(3), weight=weight)
        loss.mean().backward()
        grads.append(a.grad.clone())
    assert torch.equal(grads[0], grads[1]) == equal


def test_a_reverse_kl_run_is_a_dmd2_run(tmp_path):
    """Same seed, same TTUR and GAN: fdistill with reverse_kl trains the student to the same weights as dmd2."""
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    common = {"ratio": 1, "gan_generator_weight": 3e-3, "gan_critic_weight": 1e-2}
    a, rec_a = run_tiny(tiny_run_config(teacher, {"name": "dmd2", **common}, steps=2), tmp_path / "a")
    b, rec_b = run_tiny(tiny_run_config(teacher, {"name": "fdistill", "divergence": "reverse_kl", **common}, steps=2),
                        tmp_path / "b")
    assert [log["generator/dm"] for log in rec_a.logs] == [log["generator/dm"] for log in rec_b.logs]
    for k, v in a.nets.student.state_dict().items():
        assert torch.equal(v, b.nets.student.state_dict()[k]), k


def test_configuration_errors(tmp_path):
    from fewstep.config import ConfigError

    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    with pytest.raises(ConfigError, match="gan_critic_weight"):
        tiny_run_config(teacher, {"name": "fdistill", "gan_critic_weight": 0.0, "gan_generator_weight": 0.0})
    with pytest.raises(ConfigError, match="ratio_clip"):
        tiny_run_config(teacher, {"name": "fdistill", "ratio_clip": (2.0, 20.0)})
    with pytest.raises(ConfigError, match="divergence"):
        tiny_run_config(teacher, {"name": "fdistill", "divergence": "kl"})
