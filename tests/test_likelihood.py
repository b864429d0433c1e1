"""PF-ODE likelihood (fewstep.likelihood) against closed forms: Gaussian data N(mu, Sigma) has the exact
sigma-space denoiser D(x, sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu) and the exact density
p_sigma = N(mu, Sigma + sigma^2 I), so log p at sigma_min is known."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.likelihood import LikelihoodResult, draw_probe, log_likelihood

D = 6
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3
    cov = a @ a.T + 0.05 * torch.eye(D, dtype=torch.float64)
    mu = torch.randn(D, generator=g, dtype=torch.float64) * 0.2
    return mu, cov


def exact_denoiser(mu: torch.Tensor, cov: torch.Tensor):
    def den(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1) - mu
        out = []
        for row, s in zip(flat, sigma):
            gain = cov @ torch.linalg.inv(cov + s**2 * torch.eye(D, dtype=cov.dtype))
            out.append(mu + gain @ row)
        return torch.stack(out).view_as(x)

    return den


def exact_log_density(x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    dist = torch.distributions.MultivariateNormal(mu, cov + SIGMA_MIN**2 * torch.eye(D, dtype=cov.dtype))
    return dist.log_prob(x.flatten(1))


def samples(mu, cov, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    return (mu + z @ torch.linalg.cholesky(cov).T).view(n, 1, 2, 3)


def test_exact_trace_matches_the_closed_form_gaussian_log_density():
    mu, cov = gaussian()
    x = samples(mu, cov, 4)
    res = log_likelihood(exact_denoiser(mu, cov), x, SIGMA_MIN, SIGMA_MAX, num_steps=128, probe="exact")
    torch.testing.assert_close(res.log_p, exact_log_density(x, mu, cov), atol=1e-2, rtol=0)


def test_the_ode_converges_with_more_steps():
    mu, cov = gaussian(3)
    x = samples(mu, cov, 2)
    exact = exact_log_density(x, mu, cov)
    errors = [float((log_likelihood(exact_denoiser(mu, cov), x, SIGMA_MIN, SIGMA_MAX, n, "exact").log_p
                     - exact).abs().max()) for n in (16, 64)]
    assert errors[1] < errors[0] / 4  # Heun is second order


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(probe):
    """The same image under 400 independent probes: the mean estimate equals the exact-trace value within
    4 standard errors of the mean."""
    mu, cov = gaussian(5)
    x = samples(mu, cov, 1).expand(400, 1, 2, 3).contiguous()
    den = exact_denoiser(mu, cov)
    exact = log_likelihood(den, x[:1], SIGMA_MIN, SIGMA_MAX, 32, "exact").log_p
    est = log_likelihood(den, x, SIGMA_MIN, SIGMA_MAX, 32, probe, torch.Generator().manual_seed(0)).log_p
    assert float(est.std()) > 0  # a full covariance: the estimator is genuinely stochastic
    assert abs(float(est.mean() - exact)) < 4 * float(est.std()) / math.sqrt(len(est))


def test_probes_and_bits_per_dim():
    g = torch.Generator().manual_seed(0)
    v = draw_probe(torch.Size((1000, 4)), "rademacher", g)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert draw_probe(torch.Size((2, 3)), "exact", g) is None
    res = LikelihoodResult(log_p=torch.tensor([-10 * math.log(2.0)]), prior=torch.zeros(1), delta=torch.zeros(1))
    assert float(res.bits_per_dim(10, dequantized_8bit=False)) == pytest.approx(1.0)
    assert float(res.bits_per_dim(10)) == pytest.approx(8.0)  # + log2(128)


def test_refuses_an_empty_level_range():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(lambda x, s: x, torch.zeros(1, 1, 1, 1), 1.0, 1.0)


def test_ctm_score_model_at_initialisation_has_its_teachers_likelihood(tmp_path):
    """CTM's s input is zero-initialised, so before training g(x, t, t) is the teacher's denoiser: the score
    model the hook gives must score images exactly as the teacher does (same probes)."""
    from fewstep.likelihood import teacher_denoiser
    from fewstep.plugin import build_manager
    from fewstep.testing import make_tiny_teacher, tiny_run_config
    from fewstep.trainer import Trainer

    # Up to the teacher's top level (157 on the tiny DDPM-linear epsilon teacher), so uncapped: the default cap
    # (docs/CONDITIONING.md) makes the student read levels above sigma 15 at the cap, by design not the teacher.
    config = tiny_run_config(make_tiny_teacher(tmp_path / "teacher"), {"name": "ctm", "num_scales": 6},
                             teacher={"student_sigma_cap": "none"})
    pm = build_manager("ctm")
    trainer = Trainer(config, pm, tmp_path / "run")
    trainer.setup()
    nets = trainer.nets
    den = pm.hook.fewstep_score_denoiser(ctx=trainer.ctx, nets=nets, cond=None)
    x = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    lo, hi = nets.teacher.process.sigma_min, nets.teacher.process.sigma_max
    student = log_likelihood(den, x, lo, hi, 8, "rademacher", torch.Generator().manual_seed(1))
    teacher = log_likelihood(teacher_denoiser(nets.teacher), x, lo, hi, 8, "rademacher", torch.Generator().manual_seed(1))
    assert torch.isfinite(student.log_p).all()
    torch.testing.assert_close(student.log_p, teacher.log_p, atol=1e-3, rtol=1e-5)


def test_likelihood_command_on_a_teacher_folder(tmp_path, capsys):
    import json

    from fewstep.cli import main
    from fewstep.testing import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "teacher")
    assert main(["likelihood", str(teacher), "--num", "2", "--ode-steps", "4", "--sigma-max", "80"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num"] == 2 and result["scored"] == "teacher" and math.isfinite(result["bits_per_dim"])


def test_class_conditional_teacher_scores_each_image_under_its_own_label(tmp_path, capsys):
    """A class-conditional teacher: by default log p(x | y) with each image's label from the source (digits
    has labels), with --null-class log p(x) at the null label; the two condition the network differently, so
    with the same probes and dequantisation noise they give different numbers, and a class-conditional model
    on a source without labels is refused with the way out named."""
    import json

    from fewstep.cli import main
    from fewstep.testing import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "teacher", conditioning="class")
    common = ["likelihood", str(teacher), "--num", "2", "--ode-steps", "4", "--sigma-max", "80", "--batch", "1"]
    assert main(common) == 0
    by_label = json.loads(capsys.readouterr().out)
    assert main([*common, "--null-class"]) == 0
    null = json.loads(capsys.readouterr().out)
    assert by_label["condition"] == "each image's class" and null["condition"] == "null class"
    assert math.isfinite(by_label["bits_per_dim"]) and math.isfinite(null["bits_per_dim"])
    assert by_label["bits_per_dim"] != null["bits_per_dim"]


def test_class_conditional_ctm_student_at_initialisation_scores_as_its_teacher(tmp_path, capsys):
    """The command on a class-conditional CTM run: the student's score model (labels passed through the
    hook's cond) equals the teacher's at initialisation, per image label."""
    import json

    from fewstep.cli import main
    from fewstep.config import write_resolved
    from fewstep.plugin import build_manager
    from fewstep.testing import make_tiny_teacher, tiny_run_config
    from fewstep.trainer import Trainer

    # a run folder whose only checkpoint is taken before the first step: the student at initialisation
    # --sigma-max 80 lies above the default cap (sigma 15 on this DDPM-linear epsilon teacher): uncapped, as above
    config = tiny_run_config(make_tiny_teacher(tmp_path / "teacher", conditioning="class"),
                             {"name": "ctm", "num_scales": 6}, teacher={"student_sigma_cap": "none"})
    run = tmp_path / "run"
    trainer = Trainer(config, build_manager("ctm"), run)
    trainer.setup()
    assert trainer.save_checkpoint() is not None
    write_resolved(config, run)
    common = ["likelihood", str(run), "--num", "2", "--ode-steps", "4", "--sigma-max", "80"]
    assert main(common) == 0
    student = json.loads(capsys.readouterr().out)
    assert main([*common, "--teacher"]) == 0
    teacher = json.loads(capsys.readouterr().out)
    assert student["scored"] == "ctm student" and teacher["scored"] == "teacher"
    assert student["bits_per_dim"] == pytest.approx(teacher["bits_per_dim"], abs=1e-4)
