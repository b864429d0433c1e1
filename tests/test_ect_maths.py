"""Closed-form checks of plugins/ect.py (consistency.md §4-5): the r(t) schedule, time sampling,
weighting and adaptive loss, the boundary, SCT's stable target against a Gaussian mixture whose
posterior mean is known exactly (its variance reduction, its convergence, its reduction to ECT at
small t), phased segments, the samplers and self-guidance."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from fewstep_plugins import ect
from torch import Tensor, nn

from fewstep.diffusion import consistency_from_denoiser
from fewstep.types import Batch, Cond, Nets, OptimizerGroup, StepInfo

GROUP = OptimizerGroup("student", ("student",), lr=1e-4)
SIGMA_MIN = 0.002


# ---------------------------------------------------------------------------------------------
# r(t) and its stage schedule


def test_sigmoid_mapping_hand_value():
    # t = 2, a = 0, q = 2: n = 1 + 8 sigmoid(-2) = 1.953623; r = 2 (1 - 0.5 n) = 0.046377
    r = ect.ect_r(torch.tensor([2.0], dtype=torch.float64), 0)
    n = 1 + 8 / (1 + math.exp(2.0))
    assert float(r) == pytest.approx(2 * (1 - 0.5 * n), rel=1e-12)
    assert float(r) == pytest.approx(0.046377, abs=1e-6)


def test_r_is_zero_early_and_for_small_t():
    t = torch.logspace(-3, math.log10(80), 400, dtype=torch.float64)
    r0 = ect.ect_r(t, 0)
    # Stage 0: 1 - (1 + 8 sigmoid(-t)) / 2 <= 0 exactly when sigmoid(-t) >= 1/8, i.e. t <= ln 7.
    assert torch.equal(r0 == 0, t <= math.log(7))
    # Small t: n(t) -> 1 + k/2 = 5, so r = 0 while 5 q^-(a+1) >= 1 (stages 0 and 1 for q = 2), r > 0 after.
    for stage in range(6):
        r = ect.ect_r(t, stage)
        assert bool((r[t < 1e-2] == 0).all()) == (stage <= 1) and bool((r[t < 1e-2] > 0).all()) == (stage > 1)


def test_r_stays_below_t_and_grows_to_t_with_the_stages():
    t = torch.logspace(-3, math.log10(80), 200, dtype=torch.float64)
    previous = torch.zeros_like(t)
    for stage in range(30):
        for mapping in ("sigmoid", "const"):
            r = ect.ect_r(t, stage, mapping)
            assert (r >= 0).all() and (r <= t).all()
        r = ect.ect_r(t, stage)
        assert (r >= previous).all()  # Delta t shrinks stage by stage
        ratio = r / t
        assert (ratio[1:] >= ratio[:-1] - 1e-12).all()  # r/t grows with t (sigmoid)
        previous = r
    torch.testing.assert_close(previous, t, rtol=1e-7, atol=0)  # 9 * 2^-30 < 1e-8


def test_const_mapping_and_its_q():
    t = torch.tensor([0.01, 0.5, 3.0, 70.0], dtype=torch.float64)
    for stage, q in [(0, 2.0), (1, 2.0), (3, 4.0)]:
        torch.testing.assert_close(ect.ect_r(t, stage, "const", q=q), t * (1 - q ** -(stage + 1)))
    torch.testing.assert_close(ect.ect_r(t, 0, "sigmoid", k=0.0), ect.ect_r(t, 0, "const"))


def test_stage_is_a_function_of_images_seen():
    assert [ect.ect_stage(n, 1000) for n in (0, 999, 1000, 2500, 7999, 8000)] == [0, 0, 1, 2, 7, 8]


def test_truncated_lognormal_matches_its_law():
    lo, hi, p_mean, p_std = 0.01, 80.0, -1.1, 2.0
    t = ect.truncated_lognormal(200_000, p_mean, p_std, lo, hi, torch.Generator().manual_seed(0)).double()
    assert lo <= float(t.min()) and float(t.max()) <= hi
    # Mean of ln t of a normal truncated to [a, b] (standardised alpha, beta): mu + std (phi(a) - phi(b)) / Z.
    a, b = (math.log(lo) - p_mean) / p_std, (math.log(hi) - p_mean) / p_std
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    big_phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = p_mean + p_std * (phi(a) - phi(b)) / (big_phi(b) - big_phi(a))
    assert float(t.log().mean()) == pytest.approx(expected, abs=0.015)  # standard error ~0.004
    median = p_mean + p_std * math.sqrt(2) * torch.erfinv(torch.tensor(big_phi(a) + big_phi(b) - 1.0)).item()
    assert float(t.log().median()) == pytest.approx(median, abs=0.02)


def test_sigma_range_defaults():
    cfg = ect.ECTConfig()
    assert ect.sigma_range(cfg, SimpleNamespace(sigma_min=0.01, sigma_max=157.0)) == (0.01, 80.0)
    assert ect.sigma_range(cfg, SimpleNamespace(sigma_min=0.002, sigma_max=40.0)) == (0.002, 40.0)
    assert ect.sigma_range(ect.ECTConfig(sigma_max=20.0, sigma_min=0.1), SimpleNamespace(sigma_min=0.002,
                                                                                        sigma_max=80.0)) == (0.1, 20.0)


# ---------------------------------------------------------------------------------------------
# Weighting and the adaptive loss


def test_weightings():
    t = torch.tensor([0.1, 1.0, 5.0])
    r = torch.tensor([0.0, 0.5, 5.0])
    torch.testing.assert_close(ect.loss_weight(ect.ECTConfig(), t, r, 0.5), torch.tensor([10.0, 2.0, 0.0]))
    snr = ect.loss_weight(ect.ECTConfig(weighting="snr_k"), t, r, 0.5)
    torch.testing.assert_close(snr, (t**2 + 0.25) / (t * 0.5) ** 2)  # (t^2 + sd^2)/(t sd)^2 = 1/t^2 + 1/sd^2


def test_adaptive_loss_is_the_l2_norm_or_pseudo_huber():
    d = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    norm = d.flatten(1).norm(dim=1)
    torch.testing.assert_close(ect.adaptive_loss(d, 0.0), norm)
    torch.testing.assert_close(ect.adaptive_loss(d, 0.06), torch.sqrt(norm**2 + 0.06**2) - 0.06)
    # For |d| >> c pseudo-Huber tends to |d| - c; for |d| << c to |d|^2 / (2c).
    torch.testing.assert_close(ect.adaptive_loss(d * 1e4, 1e-3), norm * 1e4 - 1e-3, rtol=1e-6, atol=0)
    torch.testing.assert_close(ect.adaptive_loss(d * 1e-4, 1.0), (norm * 1e-4) ** 2 / 2, rtol=1e-3, atol=0)
    zero = torch.zeros(2, 1, 4, 4, requires_grad=True)
    ect.adaptive_loss(zero, 0.0).sum().backward()
    assert torch.equal(zero.grad, torch.zeros_like(zero))  # no NaN for an exact zero difference


# ---------------------------------------------------------------------------------------------
# A duck-typed sigma-space process: process.denoise(net, x, sigma, cond) = net(x, sigma, cond)


class DenoiserProcess:
    def __init__(self, sigma_min: float = SIGMA_MIN, sigma_max: float = 80.0, sigma_data: float = 0.5) -> None:
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def denoise(self, net, x, sigma, cond=None, **scalars):
        return net(x, sigma, cond)

    def for_sampler(self):  # a scheduler that bounds no x0 (NoiseProcess.for_sampler)
        return self


def _b(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Mixture:
    """x0 ~ sum_k pi_k N(mu_k, s^2 I) in D = C*H*W dims, with the exact posterior mean E[x0 | x0 + t z]."""

    def __init__(self, k: int = 4, shape=(1, 4, 4), s: float = 0.2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = (torch.rand(k, *shape, generator=g, dtype=torch.float64) - 0.5) * 1.6
        self.logpi = torch.log(torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.s, self.shape = s, shape

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        k = torch.multinomial(self.logpi.exp(), n, replacement=True, generator=g)
        return self.mu[k] + self.s * torch.randn(n, *self.shape, generator=g, dtype=torch.float64), k

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        v = self.s**2 + _b(t, x) ** 2  # x | k ~ N(mu_k, (s^2 + t^2) I)
        d2 = ((x[:, None] - self.mu[None]) ** 2).flatten(2).sum(2)  # (B, K)
        post = torch.softmax(self.logpi - d2 / (2 * v.flatten()[:, None]), dim=1)
        means = self.mu[None] + (self.s**2 / v)[:, None] * (x[:, None] - self.mu[None])  # (B, K, ...)
        return (post.reshape(*post.shape, *[1] * len(self.shape)) * means).sum(1)


class MixtureNet(nn.Module):
    """The exact denoiser of a mixture, scaled by ``gain`` away from it (gain 1: exact)."""

    def __init__(self, mixture: Mixture, gain: float = 1.0) -> None:
        super().__init__()
        self.mixture, self.gain = mixture, gain
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, cond=None):
        d = self.mixture.posterior_mean(x.double(), sigma.double()).to(x.dtype)
        return self.gain * d + 0 * self.dummy


def _step(n: int, seed: int = 7, nimg: int = 0) -> StepInfo:
    return StepInfo(step=0, nimg=nimg, total_nimg=10**9, phase="train", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(seed), local_batch=n, global_batch=n)


def _run_loss(cfg, x0: Tensor, student: nn.Module, process=None, cond: Cond | None = None, seed: int = 7,
              nimg: int = 0, monkeypatch=None):
    """The loss hook; with ``monkeypatch``, also the (online, target) pair it compared."""
    seen = []
    if monkeypatch is not None:
        real = ect.adaptive_loss

        def spy(delta, c):
            seen.append(delta.detach().clone())
            return real(delta, c)

        monkeypatch.setattr(ect, "adaptive_loss", spy)
    teacher = SimpleNamespace(process=process or DenoiserProcess(), vae=None)
    out = ect.fewstep_loss(ctx=SimpleNamespace(method=cfg), group=GROUP, batch=Batch(x0=x0, cond=cond or Cond()),
                           nets=Nets(teacher, student), step=_step(x0.shape[0], seed, nimg))
    return out, seen


def _draws(cfg, x0: Tensor, process, seed: int = 7, nimg: int = 0):
    """Re-draw the loss hook's z, t and r from an identically seeded StepInfo."""
    step = _step(x0.shape[0], seed, nimg)
    lo, hi = ect.sigma_range(cfg, process)
    z = step.randn_like(x0)
    t = step.draw(lambda n, g: ect.truncated_lognormal(n, cfg.p_mean, cfg.p_std, lo, hi, g)).to(x0.dtype)
    return z, t, ect.ect_r(t, ect.ect_stage(nimg, cfg.stage_nimg), cfg.mapping, cfg.q, cfg.k, cfg.b)


def _f(net, process, x, sigma):
    return consistency_from_denoiser(x, sigma, net(x, sigma), process.sigma_min, process.sigma_data)


# ---------------------------------------------------------------------------------------------
# The ECT loss


def test_ect_loss_compares_f_at_t_with_sg_f_at_r_on_the_same_noise(monkeypatch):
    mix = Mixture()
    x0, _ = mix.sample(64, torch.Generator().manual_seed(1))
    x0 = x0.float()
    process, net = DenoiserProcess(), MixtureNet(mix, gain=0.9)
    cfg = ect.ECTConfig(stage_nimg=1000)
    nimg = 3000  # stage 3: most samples have r > sigma_min
    out, seen = _run_loss(cfg, x0, net, process, nimg=nimg, monkeypatch=monkeypatch)
    z, t, r = _draws(cfg, x0, process, nimg=nimg)
    assert (r > SIGMA_MIN).float().mean() > 0.5
    online = _f(net, process, x0 + _b(t, x0) * z, t)
    inside = r > SIGMA_MIN
    r_eff = torch.where(inside, r, torch.full_like(r, SIGMA_MIN))
    x_r = x0 + _b(r_eff, x0) * z
    target = torch.where(_b(inside, x0).bool(), _f(net, process, x_r, r_eff), x_r)
    torch.testing.assert_close(seen[0], online - target, rtol=1e-5, atol=1e-5)
    expected = (online - target).flatten(1).norm(dim=1) / (t - r_eff)
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert out.terms["stage"] == 3.0


def test_boundary_target_is_x0_up_to_sigma_min_where_r_is_zero(monkeypatch):
    """Stage 0, t <= ln 7: r(t) = 0, and the target is the exact-boundary value f(x_r, sigma_min) =
    x0 + sigma_min z, bit for bit (no network involved): ECT's x0, up to the smallest noise level."""
    mix = Mixture()
    x0 = mix.sample(64, torch.Generator().manual_seed(2))[0].float()
    for sigma_min in (0.002, 1e-6):
        process, net = DenoiserProcess(sigma_min=sigma_min), MixtureNet(mix, gain=0.7)
        cfg = ect.ECTConfig(p_mean=-1.5, p_std=0.5)  # t well below ln 7
        out, seen = _run_loss(cfg, x0, net, process, monkeypatch=monkeypatch)
        z, t, r = _draws(cfg, x0, process)
        assert (r == 0).all() and out.terms["boundary"] == 1.0
        online = _f(net, process, x0 + _b(t, x0) * z, t)
        target = online - seen[-1]
        torch.testing.assert_close(target, x0 + sigma_min * z, rtol=0, atol=1e-6)
        assert float((target - x0).detach().abs().max()) <= 5 * sigma_min
        # The loss is diffusion training of f: |f(x_t, t) - x0 - sigma_min z| / (t - sigma_min).
        torch.testing.assert_close(out.loss.detach(), seen[-1].flatten(1).norm(dim=1) / (t - sigma_min))


def test_online_and_target_share_noise_and_dropout():
    """r forced to t (q -> infinity): with shared dropout masks online and target are identical."""
    torch.manual_seed(0)
    net = DropoutNet(p=0.5)
    process = DenoiserProcess()
    x0 = torch.randn(16, 1, 4, 4)
    cfg = ect.ECTConfig(mapping="const", q=1e12, p_mean=0.0, p_std=0.5)
    out, _ = _run_loss(cfg, x0, net.train(), process)
    assert float(out.loss.detach().abs().max()) < 1e-4  # online == target up to the r/t rounding
    # Without the shared mask, two passes of this network on the same input differ.
    x, s = torch.randn(16, 1, 4, 4), torch.ones(16)
    assert not torch.allclose(net(x, s), net(x, s))


class DropoutNet(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.drop = nn.Dropout(p)

    def forward(self, x, sigma, cond=None):
        return self.drop(self.lin(x.flatten(1))).view_as(x)


def test_student_dropout_field_sets_every_dropout_layer_and_keeps_the_teacher_weights(tmp_path):
    from fewstep.teacher import load_teacher
    from fewstep.testing import make_tiny_teacher

    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet"))
    student = ect.fewstep_build_student(ctx=SimpleNamespace(method=ect.ECTConfig(dropout=0.2)), teacher=teacher)
    drops = [m for m in student.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.2 for m in drops)
    assert student.training and all(p.requires_grad for p in student.parameters())
    for (k, v), (_, w) in zip(student.state_dict().items(), teacher.net.state_dict().items()):
        assert torch.equal(v, w), k
    assert ect.fewstep_build_student(ctx=SimpleNamespace(method=ect.ECTConfig()), teacher=teacher) is None


# ---------------------------------------------------------------------------------------------
# SCT: the stable target


def _stable_by_hand(x_t, x0, t, allowed):
    out = torch.empty_like(x0)
    for i in range(x0.shape[0]):
        js = [j for j in range(x0.shape[0]) if allowed[i, j]]
        logits = torch.stack([-((x_t[i] - x0[j]) ** 2).sum() / (2 * t[i] ** 2) for j in js])
        w = torch.softmax(logits, 0)
        out[i] = sum(wj * x0[j] for wj, j in zip(w, js))
    return out


def test_stable_weights_are_a_softmax_restricted_to_the_same_label():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(12, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.rand(12, generator=g, dtype=torch.float64) * 2 + 0.3
    x_t = x0 + _b(t, x0) * torch.randn(12, 1, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2] * 4)
    allowed = labels[:, None] == labels[None]
    x_bar, w_self = ect.stable_x0(x_t, x0, t, allowed)
    torch.testing.assert_close(x_bar, _stable_by_hand(x_t, x0, t, allowed))
    for i in range(12):  # a convex combination of same-label references only
        same = x0[labels == labels[i]].flatten(1)
        coef = torch.linalg.lstsq(same.T, x_bar[i].flatten()).solution
        torch.testing.assert_close(same.T @ coef, x_bar[i].flatten())
    everyone, _ = ect.stable_x0(x_t, x0, t)
    torch.testing.assert_close(everyone, _stable_by_hand(x_t, x0, t, torch.ones(12, 12, dtype=torch.bool)))
    # A sample alone in its class keeps its own x0: w_ii = 1 (SCT falls back to ECT).
    lonely = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    x_bar, w_self = ect.stable_x0(x_t, x0, t, lonely[:, None] == lonely[None])
    assert float(w_self[0]) == 1.0 and torch.equal(x_bar[0], x0[0])


def test_reference_mask_blocks_and_conditions():
    cfg = ect.SCTConfig(reference_size=2)
    labels = torch.tensor([0, 0, 1, 1, 0, 0])
    step = SimpleNamespace(local_batch=6, offset=6, device=torch.device("cpu"))
    mask = ect.reference_mask(cfg, Batch(x0=None, cond=Cond(labels=labels)), step)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in [(0, 2), (2, 4), (4, 6)]:  # global samples 6-11: blocks {6,7}, {8,9}, {10,11}
        expected[a:b, a:b] = True
    assert torch.equal(mask, expected & (labels[:, None] == labels[None]))
    emb = torch.randn(3, 5, 8)
    text = Cond(embeddings=torch.cat([emb, emb[:1]]))  # sample 3 has sample 0's prompt
    ids = ect.condition_ids(text)
    assert ids[0] == ids[3] and len(set(ids[:3].tolist())) == 3
    assert ect.condition_ids(Cond()) is None and ect.reference_mask(ect.SCTConfig(), Batch(None, Cond()), step) is None


def _target_errors(mix: Mixture, t: float, batch: int, batches: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean squared deviation of the denoising target from the exact posterior mean, per dimension:
    ECT's x0 (variance only) and SCT's x0_bar (variance + squared bias); and the mean w_ii."""
    g = torch.Generator().manual_seed(seed)
    ect_err = sct_err = w_ii = 0.0
    tt = torch.full((batch,), t, dtype=torch.float64)
    for _ in range(batches):
        x0, _ = mix.sample(batch, g)
        x_t = x0 + t * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        exact = mix.posterior_mean(x_t, tt)
        x_bar, w = ect.stable_x0(x_t, x0, tt)
        ect_err += float((x0 - exact).square().mean()) / batches
        sct_err += float((x_bar - exact).square().mean()) / batches
        w_ii += float(w.mean()) / batches
    return ect_err, sct_err, w_ii


def test_stable_target_reduces_the_target_variance():
    """Same batch stream, batch 128: the stable target's error is several times smaller at moderate
    and large t (where x0 is uncertain given x_t), equal at small t (where w_ii -> 1)."""
    mix = Mixture()
    ratios = {}
    for t in (0.05, 0.3, 1.0, 5.0):
        e, s, w = _target_errors(mix, t, 128, 8)
        ratios[t] = s / e
        if t == 0.05:
            assert w > 0.999 and ratios[t] == pytest.approx(1.0, abs=1e-2)
    assert ratios[0.3] < 0.6 and ratios[1.0] < 0.2 and ratios[5.0] < 0.05


def test_stable_target_approaches_the_posterior_mean_as_the_reference_grows():
    mix = Mixture()
    errors = [_target_errors(mix, 1.0, n, 4096 // n, seed=5)[1] for n in (8, 64, 512)]
    assert errors[0] > 2 * errors[1] > 4 * errors[2]
    ect_error = _target_errors(mix, 1.0, 64, 64, seed=5)[0]
    assert errors[2] < ect_error / 20


def test_sct_reduces_to_ect_at_small_t(monkeypatch):
    mix = Mixture()
    x0 = mix.sample(64, torch.Generator().manual_seed(4))[0].float()
    net = MixtureNet(mix, gain=0.8)
    small = {"p_mean": math.log(0.01), "p_std": 1e-3, "stage_nimg": 1, "mapping": "const"}
    ect_out, _ = _run_loss(ect.ECTConfig(**small), x0, net, nimg=3)
    sct_out, _ = _run_loss(ect.SCTConfig(**small), x0, net, nimg=3)
    assert float(sct_out.terms["self_weight"]) > 1 - 1e-6
    torch.testing.assert_close(sct_out.loss, ect_out.loss, rtol=1e-4, atol=1e-6)
    large = {**small, "p_mean": math.log(2.0)}
    assert not torch.allclose(_run_loss(ect.SCTConfig(**large), x0, net, nimg=3)[0].loss,
                              _run_loss(ect.ECTConfig(**large), x0, net, nimg=3)[0].loss, rtol=1e-2)


def test_sct_loss_uses_the_stable_point_on_the_ddim_line(monkeypatch):
    mix = Mixture()
    x0 = mix.sample(32, torch.Generator().manual_seed(6))[0].float()
    process, net = DenoiserProcess(), MixtureNet(mix, gain=0.9)
    cfg = ect.SCTConfig(stage_nimg=1000)
    out, seen = _run_loss(cfg, x0, net, process, nimg=4000, monkeypatch=monkeypatch)
    z, t, r = _draws(cfg, x0, process, nimg=4000)
    x_t = x0 + _b(t, x0) * z
    x_bar, _ = ect.stable_x0(x_t, x0, t)
    z_bar = (x_t - x_bar) / _b(t, x0)
    inside = r > SIGMA_MIN
    r_eff = torch.where(inside, r, torch.full_like(r, SIGMA_MIN))
    x_r = x_bar + _b(r_eff, x0) * z_bar  # the DDIM step from t to r with the stable x0 estimate
    target = torch.where(_b(inside, x0).bool(), _f(net, process, x_r, r_eff), x_r)
    torch.testing.assert_close(seen[0], _f(net, process, x_t, t) - target, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Phased SCT


def test_segments_and_floors():
    cfg = ect.SCTConfig(segment_edges=[1.0, 5.0])
    t = torch.tensor([0.01, 0.5, 1.0, 1.5, 5.0, 9.0])
    edge, floor = ect.segments(cfg, t, 0.002)
    assert edge.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 5.0]  # segments (s_m, s_m+1]
    assert floor.tolist() == pytest.approx([0.002, 0.002, 0.002, 1.0, 1.0, 5.0])
    edge, floor = ect.segments(ect.ECTConfig(), t, 0.002)
    assert (edge == 0).all() and (floor == 0.002).all()


def test_phased_map_lands_on_its_edge_and_the_target_is_taken_at_the_edge(monkeypatch):
    """Segment m >= 1: f = x0_hat + s_m (x - x0_hat)/t (PCM's DDIM form) gives f(x, s_m) = x; with the
    exact denoiser it is the exact DDIM step; r never crosses below s_m."""
    mix = Mixture()
    process, net = DenoiserProcess(), MixtureNet(mix)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 2
    sigma, edge = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 1.0],
                                                                                   dtype=torch.float64)
    f = ect.consistency_fn(net, process, x, sigma, edge, None, SIGMA_MIN, 0.5)
    x_hat = _f(net, process, x, sigma)
    torch.testing.assert_close(f, x_hat + _b(edge / sigma, x) * (x - x_hat))
    torch.testing.assert_close(ect.consistency_fn(net, process, x, edge, edge, None, SIGMA_MIN, 0.5), x)
    x0 = mix.sample(64, torch.Generator().manual_seed(8))[0].float()
    cfg = ect.SCTConfig(segment_edges=[1.0], stable_target=False, p_mean=math.log(1.8), p_std=0.1)
    out, seen = _run_loss(cfg, x0, net.float(), process, monkeypatch=monkeypatch)
    z, t, r = _draws(cfg, x0, process)
    upper = t > 1.0
    assert upper.all() and out.terms["boundary"] == 1.0  # stage 0, t ~ 1.8: r(t) < 0.3 < s_1
    on = ect.consistency_fn(net, process, x0 + _b(t, x0) * z, t, torch.where(upper, 1.0, 0.0), None, SIGMA_MIN, 0.5)
    floor = torch.where(upper, 1.0, SIGMA_MIN)
    torch.testing.assert_close(seen[0], on - (x0 + _b(floor, x0) * z), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Samplers and guidance


class Recording:
    """x0_hat(x, sigma) = a fixed function of x, recording each call."""

    def __init__(self, fn=lambda x, s: 0.5 * x) -> None:
        self.calls: list[tuple[Tensor, Tensor]] = []
        self.fn = fn

    def __call__(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return self.fn(x, sigma)


def test_ect_sampler_levels_and_renoising():
    cfg = ect.ECTConfig()
    assert ect.sample_levels(cfg, 1, 0.002, 80.0) == [80.0]
    assert ect.sample_levels(cfg, 2, 0.002, 80.0) == pytest.approx([80.0, 0.821])
    four = ect.sample_levels(cfg, 4, 0.002, 80.0)
    assert four[:2] == pytest.approx([80.0, 0.821]) and 0.821 > four[2] > four[3] > 0.002
    assert ect.sample_levels(ect.ECTConfig(sample_sigmas={3: [10.0, 2.0, 0.5]}), 3, 0.002, 80.0) == [10.0, 2.0, 0.5]
    with pytest.raises(ValueError, match="t_mid"):
        ect.sample_levels(ect.ECTConfig(t_mid=100.0), 2, 0.002, 80.0)
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    rec = Recording()
    out = ect.ect_sample(rec, noise, [80.0, 0.821], torch.Generator().manual_seed(9), clamp=False)
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(rec.calls[0][0], 80.0 * noise)
    torch.testing.assert_close(rec.calls[1][0], 0.5 * 80.0 * noise + 0.821 * z)  # x + t_mid z, no sqrt(t^2 - eps^2)
    assert rec.calls[1][1].tolist() == pytest.approx([0.821] * 4)
    torch.testing.assert_close(out, 0.5 * rec.calls[1][0])


def test_edge_skipping_visits_shifted_edges_and_is_ddim_with_an_exact_denoiser():
    edges, lo, hi = [0.5, 4.0], 0.002, 80.0
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for eta in (0.0, 0.3):
        rec = Recording()
        ect.edge_skipping_sample(rec, noise, edges, lo, hi, eta)
        levels = [float(s[0]) for _, s in rec.calls]
        assert levels == pytest.approx([80.0, 4.0 - eta * (4.0 - 0.5), 0.5 - eta * (0.5 - lo)])
    mix = Mixture()
    exact = lambda x, s: mix.posterior_mean(x, s)  # noqa: E731
    out = ect.edge_skipping_sample(exact, noise, edges, lo, hi, 0.0)
    x = 80.0 * noise  # DDIM 80 -> 4 -> 0.5 -> 0 by hand
    for s, s_next in [(80.0, 4.0), (4.0, 0.5)]:
        d = exact(x, torch.full((3,), s, dtype=torch.float64))
        x = d + s_next / s * (x - d)
    torch.testing.assert_close(out, exact(x, torch.full((3,), 0.5, dtype=torch.float64)))


def _sampling_nets(good: nn.Module, bad: nn.Module):
    teacher = SimpleNamespace(process=DenoiserProcess(), vae=None)
    return Nets(teacher, good, {"snapshot": bad})


@pytest.mark.parametrize("edges", [[], [1.0]])
def test_guidance_with_the_same_model_twice_equals_unguided(edges):
    mix = Mixture()
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    same = _sampling_nets(MixtureNet(mix, 0.9), MixtureNet(mix, 0.9))
    other = _sampling_nets(MixtureNet(mix, 0.9), MixtureNet(mix, 0.6))
    unguided = ect.SCTConfig(segment_edges=edges)
    guided = ect.SCTConfig(segment_edges=edges, guidance_snapshot=0.5, guidance=2.5)

    def sample(cfg, nets, k):
        return ect.fewstep_sample(ctx=SimpleNamespace(method=cfg), nets=nets, noise=noise, cond=None, num_steps=k,
                                  generator=torch.Generator().manual_seed(3))

    for k in (1, 2):
        assert torch.equal(sample(guided, same, k), sample(unguided, same, k))
        assert not torch.allclose(sample(guided, other, k), sample(unguided, other, k))


def test_guided_combination():
    good, bad = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(ect.guided(good, bad, 2.0), torch.tensor([3.0, 7.0]))  # bad + w (good - bad)
    assert torch.equal(ect.guided(good, bad, 1.0), good) and torch.equal(ect.guided(good, None, 3.0), good)


def test_snapshot_copies_the_ema_once_at_its_fraction():
    student, ema, snapshot = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    nets = Nets(SimpleNamespace(), student, {"ema": ema, "snapshot": snapshot})
    ctx = SimpleNamespace(method=ect.SCTConfig(guidance_snapshot=0.25), global_batch=10)
    initial = snapshot.weight.detach().clone()
    taken = None
    for nimg in range(0, 100, 10):
        with torch.no_grad():
            ema.weight.add_(1.0)  # the EMA moves every step
        step = StepInfo(step=nimg // 10, nimg=nimg, total_nimg=100, phase="train", phase_progress=0.0,
                        progress=nimg / 100, generator=torch.Generator())
        ect.fewstep_after_optimizer_step(ctx=ctx, group=GROUP, nets=nets, step=step)
        if nimg < 20:
            assert torch.equal(snapshot.weight, initial), nimg
        if nimg == 20:  # the step that reaches 25 images (images seen 20 -> 30)
            assert torch.equal(snapshot.weight, ema.weight)
            taken = ema.weight.detach().clone()
        if nimg > 20:
            assert torch.equal(snapshot.weight, taken), nimg


def test_reference_blocks_make_the_stable_loss_independent_of_the_process_split():
    """Global batch 8 on one process vs two processes of 4 (same StepInfo draws): equal per-sample
    losses when the reference blocks (4) fit in a process's micro-batch; with the whole micro-batch as
    the reference set the split changes the target."""
    mix = Mixture()
    x0 = mix.sample(8, torch.Generator().manual_seed(9))[0].float()
    net = MixtureNet(mix, gain=0.9)

    def loss(cfg, rows: slice, offset: int) -> Tensor:
        step = StepInfo(step=0, nimg=0, total_nimg=100, phase="train", phase_progress=0.0, progress=0.0,
                        generator=torch.Generator().manual_seed(7), local_batch=rows.stop - rows.start,
                        global_batch=8, offset=offset)
        teacher = SimpleNamespace(process=DenoiserProcess(), vae=None)
        return ect.fewstep_loss(ctx=SimpleNamespace(method=cfg), group=GROUP, batch=Batch(x0=x0[rows], cond=Cond()),
                                nets=Nets(teacher, net), step=step).loss

    for cfg, same in [(ect.SCTConfig(reference_size=4, p_mean=1.0, p_std=0.3), True),
                      (ect.SCTConfig(p_mean=1.0, p_std=0.3), False)]:
        split = torch.cat([loss(cfg, slice(0, 4), 0), loss(cfg, slice(4, 8), 4)])
        assert torch.allclose(split, loss(cfg, slice(0, 8), 0)) == same
