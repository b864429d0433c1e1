"""fewstep.distribution against closed forms: the DM gradient on Gaussian data with exact Gaussian denoisers
(sign, scale, and that it moves a generator onto the data), the teacher weighting of the denoising loss,
the training grid and generator levels, backward simulation and the multistep sampler (specs/distribution.md
§1-§2)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fewstep.diffusion import EDMProcess, FlowProcess, VPProcess, karras_sigmas, score_from_x0
from fewstep.distribution import (
    Players,
    Schedule,
    denoising_loss,
    denoising_weight,
    dm_direction,
    dm_loss,
    few_step_sample,
    generate,
    generator_levels,
    generator_objective,
    levels_per_sample,
    routed,
    simulate,
    simulation_steps,
    surrogate_loss,
    training_sigmas,
)
from fewstep.types import StepInfo


def gaussian_denoiser(mean: torch.Tensor, std: torch.Tensor):
    """Exact E[x0 | x0 + sigma eps] for x0 ~ N(mean, std² I): mean + std²/(std² + sigma²) (x − mean)."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        k = (std**2 / (std**2 + sigma**2)).view(-1, *([1] * (x.ndim - 1)))
        return mean + k * (x - mean)

    return denoise


def step_info(batch: int, seed: int = 0, *, offset: int = 0, world: int = 1, global_batch: int | None = None):
    return StepInfo(step=0, nimg=0, total_nimg=100, phase="train", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(seed), rank=offset // batch, world_size=world,
                    local_batch=batch, global_batch=global_batch or batch, offset=offset)


# ---------------------------------------------------------------------------------------------
# The distribution-matching gradient


def test_dm_gradient_is_delta_over_n_with_the_mean_absolute_normaliser():
    torch.manual_seed(0)
    b, d = 6, (2, 4, 4)
    real = gaussian_denoiser(torch.tensor(0.5), torch.tensor(0.3))
    fake = gaussian_denoiser(torch.tensor(-0.2), torch.tensor(0.6))
    x = (torch.randn(b, *d) * 0.6 - 0.2).requires_grad_(True)
    sigma, eps = torch.rand(b) * 2 + 0.1, torch.randn(b, *d)
    loss, delta = dm_loss(x, real, fake, sigma, eps)
    loss.mean().backward()
    x_t = x.detach() + sigma.view(-1, 1, 1, 1) * eps
    mu_r, mu_f = real(x_t, sigma), fake(x_t, sigma)
    norm = (x.detach() - mu_r).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (mu_f - mu_r) / norm                                            # §1.2 implementation form
    torch.testing.assert_close(delta, expected)
    torch.testing.assert_close(x.grad, expected / x.numel())                   # §0.1: dL/dx = Delta / N
    # The paper's form: Delta = sigma² (s_fake − s_real) / mean|x − mu_real| (alpha = 1 in sigma space).
    scores = (score_from_x0(x_t, mu_f, sigma) - score_from_x0(x_t, mu_r, sigma)) * sigma.view(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(delta, scores / norm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, 0.5 * expected.square().flatten(1).mean(1))


def test_dm_gradient_points_from_the_fake_towards_the_real_distribution():
    """Equal spreads: mu_fake − mu_real = (1 − k)(m_fake − m_real), so −grad is along m_real − m_fake."""
    m_real, m_fake = torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([-0.5, 0.5, 0.5, 2.0])
    std = torch.tensor(0.4)
    x = (m_fake + std * torch.randn(64, 4)).requires_grad_(True)
    loss, _ = dm_loss(x, gaussian_denoiser(m_real, std), gaussian_denoiser(m_fake, std),
                      torch.full((64,), 0.7), torch.randn(64, 4))
    loss.mean().backward()
    direction = (m_real - m_fake) / (m_real - m_fake).norm()
    cosine = (-x.grad @ direction) / x.grad.norm(dim=1)
    torch.testing.assert_close(cosine, torch.ones(64))


def test_dm_loss_moves_a_gaussian_generator_onto_the_data():
    """Generator x = m + s z with the exact fake denoiser of its current law: L_DM alone takes (m, s) to the
    data's (m_r, s_r), the fixed point where the fake and real scores agree."""
    torch.manual_seed(1)
    m_real, s_real = torch.tensor([0.8, -0.4, 0.1]), torch.tensor(0.35)
    m = torch.zeros(3, requires_grad=True)
    log_s = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=0.02)
    real = gaussian_denoiser(m_real, s_real)
    for _ in range(800):
        x = m + log_s.exp() * torch.randn(256, 3)
        fake = gaussian_denoiser(m.detach(), log_s.detach().exp())
        sigma = torch.rand(256) * 1.5 + 0.05
        loss, _ = dm_loss(x, real, fake, sigma, torch.randn(256, 3))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    torch.testing.assert_close(m.detach(), m_real, atol=0.03, rtol=0)
    assert abs(log_s.exp().item() - s_real.item()) < 0.03


def test_dm_direction_is_finite_where_the_normaliser_vanishes():
    x = torch.zeros(2, 1, 2, 2)
    delta = dm_direction(x, x.clone(), torch.ones(2, 1, 2, 2))
    assert torch.isfinite(delta).all()


def test_surrogate_gradient_is_any_direction_over_n():
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    direction = torch.randn(3, 1, 2, 2)
    surrogate_loss(x, direction).mean().backward()
    torch.testing.assert_close(x.grad, direction / x.numel())


# ---------------------------------------------------------------------------------------------
# The teacher's weighting


@pytest.mark.parametrize("process", [VPProcess(prediction_type="epsilon"), VPProcess(prediction_type="v_prediction"),
                                     VPProcess(prediction_type="sample"), EDMProcess(), FlowProcess()],
                         ids=["vp-eps", "vp-v", "vp-x0", "edm", "flow"])
def test_denoising_loss_is_the_teachers_pretraining_loss(process):
    """weight(sigma) |x0_pred − x0*|² equals loss_weight(t) |out_pred − out*|² on the raw network outputs."""
    torch.manual_seed(0)
    sigma = torch.tensor([0.05, 0.5, 3.0, 20.0])
    x0, pred = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(4, 1, 4, 4)
    t = process.sigma_to_t(sigma)
    x_t = process.alpha(t).view(-1, 1, 1, 1) * x
    raw = (process.output_from_x0(pred, x_t, t) - process.output_from_x0(x0, x_t, t)).square().flatten(1).mean(1)
    ours = denoising_loss(process, lambda x_, s_: pred, x, sigma, x0)
    torch.testing.assert_close(ours, process.loss_weight(t) * raw, rtol=1e-4, atol=0)


def test_edm_weight_is_one_over_sigma_squared_plus_one_over_sigma_data_squared():
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0])
    torch.testing.assert_close(denoising_weight(EDMProcess(), sigma), 1 / sigma**2 + 1 / 0.5**2)      # §1.3
    torch.testing.assert_close(denoising_weight(VPProcess(), sigma[1:]), 1 / sigma[1:] ** 2, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# Levels


def test_training_grid_and_generator_levels_follow_the_official_indices():
    vp = VPProcess()
    grid = training_sigmas(vp)
    torch.testing.assert_close(grid, vp.t_to_sigma(torch.arange(1000.0)))
    edm = training_sigmas(EDMProcess())
    torch.testing.assert_close(edm, karras_sigmas(1000, 0.002, 80.0).flip(0))
    flow = training_sigmas(FlowProcess(shift=3.0))
    assert (flow[1:] >= flow[:-1]).all() and flow[-1] == pytest.approx(FlowProcess(shift=3.0).sigma_max)
    cfg = SimpleNamespace(dm_t_range=(0.02, 0.98), num_steps=4, sigma_max=None, levels=None, gan_t_max=1.0)
    sched = Schedule.of(cfg, vp)
    assert sched.dm == (20, 980) and sched.gan == 1000
    torch.testing.assert_close(sched.levels, grid[[999, 749, 499, 249]])          # DMD2 §2.7
    assert set(generator_levels(grid, 2).tolist()) <= set(sched.levels.tolist())
    assert generator_levels(grid, 1, sigma_max=80.0).tolist() == [80.0]
    low = generator_levels(grid, 4, sigma_max=grid[399].item())       # DMD2 SDXL: timestep 399 (§2.6)
    torch.testing.assert_close(low, grid[[399, 299, 199, 99]])
    top = int((grid <= 2.5).sum()) - 1                                  # 439 on this schedule
    torch.testing.assert_close(generator_levels(grid, 4, sigma_max=2.5),
                               torch.cat([torch.tensor([2.5]), grid[[top - k * (top + 1) // 4 for k in (1, 2, 3)]]]))
    with pytest.raises(ValueError, match="fewer than"):
        generator_levels(grid, 4, sigma_max=grid[2].item())
    drawn = sched.draw(step_info(512), *sched.dm)
    assert drawn.min() >= grid[20] and drawn.max() <= grid[980]


def test_explicit_generator_levels_snap_to_the_grid_and_sample_on_their_subsets():
    """method.levels: the N trained levels, each the nearest grid level in log sigma; k-step sampling takes
    entries j*N//k, so every sampled level was trained; more steps than levels fall back to the even split below
    the first; levels off the grid or two levels on one grid point are refused."""
    grid = training_sigmas(VPProcess())
    wanted = [2.0, 1.5, 1.0, 0.71]
    four = generator_levels(grid, 4, levels=wanted)
    nearest = [int((grid.log() - math.log(v)).abs().argmin()) for v in wanted]
    torch.testing.assert_close(four, grid[nearest])
    assert (four - torch.tensor(wanted)).abs().max() < 0.01                # the VP grid is dense around sigma 1
    torch.testing.assert_close(generator_levels(grid, 2, levels=wanted), four[[0, 2]])
    torch.testing.assert_close(generator_levels(grid, 3, levels=wanted), four[[0, 1, 2]])
    torch.testing.assert_close(generator_levels(grid, 1, levels=wanted), four[[0]])
    cfg = SimpleNamespace(dm_t_range=(0.02, 0.98), num_steps=4, sigma_max=None, levels=wanted, gan_t_max=1.0)
    torch.testing.assert_close(Schedule.of(cfg, VPProcess()).levels, four)
    torch.testing.assert_close(generator_levels(grid, 8, levels=wanted),   # more steps than levels: the even split
                               generator_levels(grid, 8, sigma_max=four[0].item()))
    with pytest.raises(ValueError, match="outside the teacher's training grid"):
        generator_levels(grid, 2, levels=[1000.0, 1.0])
    with pytest.raises(ValueError, match="snap to the same grid level"):
        generator_levels(grid, 2, levels=[1.0, 0.99999])


# ---------------------------------------------------------------------------------------------
# Backward simulation and sampling


class Recording:
    """A generator x0 = 0.5 x − sigma that records its inputs and whether autograd was on."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().clone(), sigma.clone(), torch.is_grad_enabled()))
        return 0.5 * x - sigma.view(-1, 1, 1, 1)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_backward_simulation_feeds_the_generator_its_own_outputs(k):
    levels = torch.tensor([80.0, 20.0, 5.0, 1.0])
    g = Recording()
    noise = torch.randn(3, 1, 2, 2)
    step = step_info(3, seed=7)
    x_in, sigma = simulate(g, noise, levels, k, step)
    replay = step_info(3, seed=7)
    assert len(g.calls) == k and not any(grad for *_, grad in g.calls)
    expected = noise * 80.0
    for j, (x, s, _) in enumerate(g.calls):
        torch.testing.assert_close(x, expected)
        torch.testing.assert_close(s, levels[j].expand(3))
        expected = (0.5 * x - s.view(-1, 1, 1, 1)) + levels[j + 1] * replay.randn_like(x)
    torch.testing.assert_close(x_in, expected)
    torch.testing.assert_close(sigma, levels[k].expand(3))


def test_per_sample_simulation_gives_each_sample_the_input_of_its_own_level():
    """simulate with a (B,) tensor of levels: row i equals row i of the one-level simulation at k_i (the same
    step draws), the generator runs max(k) steps on the whole batch, and each row's level comes back."""
    levels = torch.tensor([80.0, 20.0, 5.0, 1.0])
    noise = torch.randn(6, 1, 2, 2)
    ks = torch.tensor([3, 0, 1, 3, 2, 1])
    g = Recording()
    x_in, sigma = simulate(g, noise, levels, ks, step_info(6, seed=5))
    assert [len(x) for x, *_ in g.calls] == [6, 6, 6] and not any(grad for *_, grad in g.calls)
    torch.testing.assert_close(sigma, levels[ks])
    for k in range(4):
        rows = ks == k
        one_level, _ = simulate(Recording(), noise, levels, k, step_info(6, seed=5))
        torch.testing.assert_close(x_in[rows], one_level[rows])


def test_per_sample_levels_without_simulation_noise_real_images_at_each_level():
    """backward_simulation false with per-sample levels: level 0 is pure noise at the top level (as the one-level
    path), every other row its real image noised to its own level; the generator is called at those levels."""
    sched = Schedule(torch.linspace(0.01, 80, 1000), torch.tensor([80.0, 20.0, 5.0, 1.0]), (20, 980), 1000)
    g, x_real, ks = Recording(), torch.randn(4, 1, 2, 2), torch.tensor([0, 2, 3, 1])
    generate(SimpleNamespace(backward_simulation=False), sched, g, (1, 2, 2), step_info(4, seed=2), x_real, ks)
    ((x_in, sigma, _),) = g.calls
    z = step_info(4, seed=2).randn(1, 2, 2)
    torch.testing.assert_close(sigma, torch.tensor([80.0, 5.0, 1.0, 20.0]))
    torch.testing.assert_close(x_in[0], 80.0 * z[0])
    torch.testing.assert_close(x_in[1:], x_real[1:] + sigma[1:].view(-1, 1, 1, 1) * z[1:])


def test_levels_per_sample_share_the_global_batch_evenly_across_ranks():
    """Every level gets B/N samples of the global batch (one more for B mod N of them); two ranks' rows are the
    two halves of the one-process draw and each holds every level; the shift varies with the step; a
    micro-batch smaller than N is refused."""
    whole = levels_per_sample(step_info(10, seed=3), 4)
    assert torch.bincount(whole, minlength=4).sort(descending=True).values.tolist() == [3, 3, 2, 2]
    halves = [levels_per_sample(step_info(5, seed=3, offset=r * 5, world=2, global_batch=10), 4) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    assert all(set(h.tolist()) == {0, 1, 2, 3} for h in halves)
    assert {int(levels_per_sample(step_info(8, seed=s), 4)[0]) for s in range(40)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least num_steps samples per micro-batch"):
        levels_per_sample(step_info(3, seed=0, offset=3, world=2, global_batch=6), 4)


def test_routed_sends_each_row_to_its_network_and_back_in_order():
    """routed: the rows of each part go through that part's function; the result is in the batch's order and
    the gradient reaches each function's own parameter through its rows only."""
    w = torch.tensor([2.0, 3.0], requires_grad=True)
    rows = [torch.tensor([0, 3]), torch.tensor([1, 2, 4]), torch.tensor([], dtype=torch.long)]
    fns = [lambda x, s: w[0] * x + s, lambda x, s: w[1] * x - s, lambda x, s: x * float("nan")]
    call = routed(list(zip(rows, fns)))
    x, sigma = torch.arange(5.0), torch.full((5,), 0.5)
    out = call(x, sigma)
    torch.testing.assert_close(out, torch.tensor([0.5, 2.5, 5.5, 6.5, 11.5]))
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.0 + 3.0, 1.0 + 2.0 + 4.0]))


def test_simulation_step_is_shared_by_every_rank():
    """k comes from the step's generator, seeded alike on every rank: two ranks of a 2-process step agree."""
    ks = {simulation_steps(step_info(4, seed=s, offset=r * 4, world=2, global_batch=8), 4) for r in (0, 1)
          for s in [3]}
    assert len(ks) == 1
    assert {simulation_steps(step_info(4, seed=s), 4) for s in range(40)} == {0, 1, 2, 3}


def test_generator_turn_backpropagates_only_the_last_generator_call():
    g = Recording()
    cfg = SimpleNamespace(backward_simulation=True)
    sched = Schedule(torch.linspace(0.01, 80, 1000), torch.tensor([80.0, 20.0, 5.0, 1.0]), (20, 980), 1000)
    w = torch.tensor(1.0, requires_grad=True)
    gen = lambda x, s: w * g(x, s)  # noqa: E731
    same = gaussian_denoiser(torch.tensor(0.0), torch.tensor(1.0))
    for seed in range(6):
        g.calls.clear()
        step, ref = step_info(2, seed=seed), step_info(2, seed=seed)
        ref.randn(1, 2, 2)  # the turn draws its noise z first, then k
        k = simulation_steps(ref, 4)
        loss, terms = generator_objective(cfg, sched, Players(gen, same, same), (1, 2, 2), step)
        assert terms["sim_step"] == k and len(g.calls) == k + 1
        assert [grad for *_, grad in g.calls] == [False] * k + [True]
        torch.testing.assert_close(loss, torch.zeros(2))   # real == fake: no distribution-matching step


def test_few_step_sampler_renoises_the_generator_outputs():
    g = Recording()
    levels = torch.tensor([80.0, 10.0, 2.0])
    noise = torch.randn(2, 1, 2, 2)
    out = few_step_sample(g, noise, levels, torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(0)
    x = noise * 80.0
    for j, (seen, s, _) in enumerate(g.calls):
        torch.testing.assert_close(seen, x)
        x0 = 0.5 * x - s.view(-1, 1, 1, 1)
        if j + 1 < 3:
            x = x0 + levels[j + 1] * torch.randn(x0.shape, generator=rng)
    assert len(g.calls) == 3
    torch.testing.assert_close(out, x0)
