"""tcm plugin (Truncated Consistency Models, arXiv 2410.14895): conformance on UNet and DiT teachers across the
stage hand-over, the stage-2 time proposal, and the truncated and boundary losses on a Gaussian problem whose
consistency function is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from fewstep_plugins import tcm

from fewstep.consistency import adaptive_loss, ect_r, inverse_gap_weight, truncated_log_student_t
from fewstep.hookspecs import hookimpl
from fewstep.sampling import sampling_net
from fewstep.testing import MethodConformance, Recorder, make_tiny_teacher, tiny_run_config

# ---------------------------------------------------------------------------------------------
# Conformance: 4 steps of 4 images, stage 1 for the first 2 (the resume test restarts at the hand-over)


class TestTCMConformance(MethodConformance):
    method = {"name": "tcm", "stage_nimg": 8}
    backbones = ("unet",)


class TestTCMDiTConformance(MethodConformance):
    method = {"name": "tcm", "huber_c": 0.03, "transition_sigma": 2.0}
    backbones = ("dit",)


class _StageOneSnapshot:
    """Keeps the sampling network's weights when the stage-1 phase ends."""

    state: dict[str, torch.Tensor] = {}

    @hookimpl
    def fewstep_on_phase_end(self, phase, nets) -> None:
        if phase.name == tcm.STAGE1:
            self.state = {k: v.detach().clone() for k, v in sampling_net(nets).state_dict().items()}


def test_stage_one_model_is_frozen_at_the_hand_over(tmp_path):
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    config = tiny_run_config(make_tiny_teacher(tmp_path / "t", "unet"), {"name": "tcm"}, steps=4)
    pm = build_manager("tcm")
    snap = _StageOneSnapshot()
    pm.register(snap, name="snapshot")
    trainer = Trainer(config, pm, tmp_path / "run")
    trainer.fit()
    stage1, student = trainer.nets.extra["stage1"].state_dict(), trainer.nets.student.state_dict()
    assert snap.state and all(torch.equal(stage1[k], v) for k, v in snap.state.items())
    assert any(not torch.equal(stage1[k], student[k]) for k in stage1)  # the student moved on in stage 2
    assert not any(p.requires_grad for p in trainer.nets.extra["stage1"].parameters())


def test_stage_two_runs_at_its_share_of_the_learning_rate(tmp_path):
    """TCM halves the learning rate for stage 2 (5e-5 after 1e-4); ``stage2_lr_scale`` is that factor on the one
    optimizer both stages share, applied from the first stage-2 step."""
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    config = tiny_run_config(make_tiny_teacher(tmp_path / "t", "unet"), {"name": "tcm", "stage2_lr_scale": 0.25},
                             steps=4, optimizer={"lr": 1e-3})
    pm = build_manager("tcm")
    rec = Recorder()
    pm.register(rec, name="recorder")
    Trainer(config, pm, tmp_path / "run").fit()
    assert [log["student/lr"] for log in rec.logs] == pytest.approx([1e-3, 1e-3, 2.5e-4, 2.5e-4])


# ---------------------------------------------------------------------------------------------
# Time proposal


def test_truncated_log_student_t_matches_its_distribution():
    lo, hi, p_mean, p_std, df = 1.0, 80.0, 0.0, 0.2, 0.01
    t = truncated_log_student_t(50_000, p_mean, p_std, df, lo, hi, torch.Generator().manual_seed(0)).double()
    assert float(t.min()) >= lo and float(t.max()) <= hi
    def cdf(x: float) -> float:  # the Student-t CDF in closed form through the regularised incomplete beta
        from scipy.special import betainc

        z = (math.log(x) - p_mean) / p_std
        tail = 0.5 * betainc(df / 2, 0.5, df / (df + z * z))
        return 1 - tail if z > 0 else tail

    c_lo, c_hi = cdf(lo), cdf(hi)
    for q in (1.01, 1.5, 3.0, 10.0, 40.0):
        expected = (cdf(q) - c_lo) / (c_hi - c_lo)
        assert float((t <= q).double().mean()) == pytest.approx(expected, abs=0.01)
    # df 0.01 is extremely heavy-tailed: the proposal reaches the whole truncated range, not only t ~ e^0 = 1
    assert float((t > 10).double().mean()) > 0.05  # 11.5 scales above the mode: a log-normal would give ~1e-30


def test_capped_stage_reproduces_the_clipped_ratio():
    cfg = tcm.TCMConfig(stage_nimg=100)
    ratios = [1 - cfg.q ** -(tcm.capped_stage(n, cfg) + 1) for n in (0, 100, 800, 900, 5000)]
    assert ratios == pytest.approx([0.5, 0.75, 1 - 2**-9, 0.999, 0.999])


# ---------------------------------------------------------------------------------------------
# Gaussian data x0 ~ N(MU, S²) per pixel, x = x0 + sigma·z: the PF-ODE flow is affine,
# phi(x, sigma -> s) = MU + sqrt((S² + s²)/(S² + sigma²))·(x − MU), and f*(x, sigma) = phi(x, sigma -> sigma_min).

MU, S, LO, T_PRIME = 0.2, 0.5, 0.002, 1.0


def _b(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def phi(x, sigma, s):
    return MU + _b(torch.sqrt((S**2 + s**2) / (S**2 + sigma**2)), x) * (x - MU)


def exact_f(x, sigma):
    return phi(x, sigma, torch.full_like(sigma, LO))


def _stage2_pairs():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1.0, 1.0, 1.05, 1.3, 2.0, 5.0, 20.0, 80.0], dtype=torch.float64)
    boundary = t == T_PRIME
    r = ect_r(t, 0).clamp_min(LO)  # stage 0: wide gaps, so several pairs cross t' from above
    x_t = MU + S * torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    x_t = x_t + _b(t, x_t) * torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    return t, r, boundary, x_t, phi(x_t, t, r)  # x_r on the exact trajectory through x_t


def _losses(f_student, f_stage1, t, r, x_t, x_r):
    target = tcm.composite_target(f_student, f_stage1, x_r, r, T_PRIME, LO)
    return inverse_gap_weight(t, r) * adaptive_loss(f_student(x_t, t) - target, 0.0)


def test_the_exact_consistency_function_has_zero_truncated_and_boundary_loss():
    t, r, boundary, x_t, x_r = _stage2_pairs()
    assert bool((r[boundary] < T_PRIME).all()) and bool((r[~boundary] >= T_PRIME).any())
    assert float(_losses(exact_f, exact_f, t, r, x_t, x_r).abs().max()) < 1e-9


def test_only_the_boundary_loss_sees_a_student_that_drifted_from_stage_one():
    """A student offset by a constant c above t' (the trivial solution of truncated training) is consistent with
    itself inside [t', T]: every pair that stays above t' has zero loss. Pairs that cross t', the boundary pairs
    among them, compare it with the stage-1 model and pay w·||c||."""
    t, r, boundary, x_t, x_r = _stage2_pairs()
    c = 0.3

    def drifted(x, sigma):
        return exact_f(x, sigma) + c

    losses = _losses(drifted, exact_f, t, r, x_t, x_r)
    crossing = r < T_PRIME
    assert float(losses[~crossing].abs().max()) < 1e-9
    norm = c * math.sqrt(x_t[0].numel())
    torch.testing.assert_close(losses[crossing], inverse_gap_weight(t, r)[crossing] * norm)
    # Without stage 1 (the student everywhere: the stage-1 objective) the drift is invisible except at sigma_min.
    free = _losses(drifted, None, t, r, x_t, x_r)
    assert float(free[r > LO].abs().max()) < 1e-9
    # The per-sample weights make the batch mean the paper's two means: E[w] = 1 + boundary_weight.
    w = tcm.stage2_weights(torch.rand(200_000, generator=torch.Generator().manual_seed(1)) < 0.25, 0.25, 0.1)
    assert float(w.double().mean()) == pytest.approx(1.1, abs=0.01)
