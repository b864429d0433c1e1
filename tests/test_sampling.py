"""Multistep samplers on trained levels (fewstep.sampling.grid_levels, issue 14 item 3): the N-step sampler of a
consistency-type method queries only levels its student trained on, a recipe's sample_sigmas still wins, and the
stock consistency scheduler on the same grid picks the same levels."""

from types import SimpleNamespace

import pytest
import torch
from fewstep_plugins import cm, ctm, pcm
from torch import nn

from fewstep.diffusion import EDMProcess, VPProcess, karras_sigmas
from fewstep.sampling import grid_levels, sampler_sigmas
from fewstep.types import Nets

# The 6-point CD grid on the digits teacher (sigma_max 80): 80, 26.8, 7.33, 1.49, 0.19, sigma_min.
GRID6 = karras_sigmas(6, 0.002, 80.0)


def test_grid_levels_take_every_m_over_n_th_point_from_the_top():
    assert grid_levels(GRID6, 1) == [80.0]
    assert grid_levels(GRID6, 2) == pytest.approx(GRID6[[0, 3]].tolist())  # 80, 1.49
    assert grid_levels(GRID6, 4) == pytest.approx(GRID6[[0, 1, 2, 3]].tolist())  # 80, 26.8, 7.33, 1.49
    assert grid_levels(list(range(40, 0, -1)), 2) == [40, 20]  # CM's ImageNet grid: index 20 (paper's search: 22)
    with pytest.raises(ValueError, match="only 6"):
        grid_levels(GRID6, 7)


def test_overrides_win_and_are_checked():
    assert sampler_sigmas({2: [50.0, 5.0]}, 2, GRID6) == [50.0, 5.0]
    assert sampler_sigmas({2: [50.0, 5.0]}, 4, GRID6) == pytest.approx(GRID6[:4].tolist())
    with pytest.raises(ValueError, match=r"sample_sigmas\[2\] has 1 levels"):
        sampler_sigmas({2: [50.0]}, 2, GRID6)


@pytest.mark.parametrize(("num_scales", "num_steps"), [(18, 2), (18, 4), (6, 3), (40, 2), (4, 4), (7, 1)])
def test_stock_consistency_scheduler_on_the_grid_picks_the_same_levels(num_scales, num_steps):
    """CMStochasticIterativeScheduler with num_train_timesteps = M (the cm plugin's export) and set_timesteps(N)."""
    from diffusers import CMStochasticIterativeScheduler

    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=num_scales, sigma_min=0.002, sigma_max=80.0)
    scheduler.set_timesteps(num_steps)
    ours = grid_levels(karras_sigmas(num_scales, 0.002, 80.0), num_steps)
    torch.testing.assert_close(scheduler.sigmas[:num_steps].double(), torch.tensor(ours, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def _levels_queried(plugin, method, process, num_steps, monkeypatch):
    """The levels the plugin's fewstep_sample passes to its sampler (the sampler itself is replaced)."""
    seen = {}

    def fake(f, noise, sigmas, *args, **kwargs):
        seen["sigmas"] = list(sigmas)
        return noise

    monkeypatch.setattr(plugin, "consistency_sample" if plugin is cm else "gamma_sample", fake)
    teacher = SimpleNamespace(process=process, vae=None)
    nets = Nets(teacher=teacher, student=nn.Identity())
    ctx = SimpleNamespace(method=method)
    plugin.fewstep_sample(ctx=ctx, nets=nets, noise=torch.zeros(1, 1, 2, 2), cond=None, num_steps=num_steps,
                          generator=torch.Generator())
    return seen["sigmas"]


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_cd_default_levels_are_points_of_its_training_grid_and_override_wins(num_steps, monkeypatch):
    method = cm.CDConfig(num_scales=6, sigma_max=80.0)
    process = VPProcess()
    grid = cm.cd_grid(method, process)
    levels = _levels_queried(cm, method, process, num_steps, monkeypatch)
    assert len(levels) == num_steps and levels[0] == pytest.approx(80.0)
    for level in levels:
        assert torch.isclose(grid, torch.tensor(level), rtol=1e-6, atol=0).any(), (level, grid)
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == num_steps
    custom = {num_steps: [60.0, 3.0, 1.0, 0.5][:num_steps]}
    assert _levels_queried(cm, method.model_copy(update={"sample_sigmas": custom}), process, num_steps,
                           monkeypatch) == custom[num_steps]


def test_lcm_style_cd_samples_on_its_teacher_timestep_grid(monkeypatch):
    """grid: teacher (LCM): 4 steps at timesteps 999, 759, 519, 279 of the skip-20 grid 999, 979, ..., 19."""
    process = VPProcess()
    method = cm.CDConfig(grid="teacher", boundary="lcm", solver="ddim")
    levels = _levels_queried(cm, method, process, 4, monkeypatch)
    steps = process.sigma_to_t(torch.tensor(levels, dtype=torch.float64))
    torch.testing.assert_close(steps, torch.tensor([999.0, 759.0, 519.0, 279.0], dtype=torch.float64),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize(("name", "final_points"), [("ct", 151), ("ict", 1281)])
def test_ct_and_ict_sample_on_their_final_curriculum_grid(name, final_points, monkeypatch):
    method = cm.CTConfig() if name == "ct" else cm.ICTConfig()
    process = EDMProcess()
    grid = karras_sigmas(final_points, process.sigma_min, process.sigma_max)
    assert cm.trained_grid(method, process).numel() == final_points
    levels = _levels_queried(cm, method, process, 2, monkeypatch)
    assert levels == pytest.approx(grid[[0, final_points // 2]].tolist())


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_ctm_default_levels_are_points_of_its_training_grid(num_steps, monkeypatch):
    method = ctm.CTMConfig(num_scales=10, num_heun_steps_max=3, sigma_max=80.0)
    process = VPProcess()
    grid = karras_sigmas(10, process.sigma_min, 80.0)
    levels = _levels_queried(ctm, method, process, num_steps, monkeypatch)
    assert levels == pytest.approx(grid[[i * (10 // num_steps) for i in range(num_steps)]].tolist())
    custom = {num_steps: [60.0, 3.0, 1.0, 0.5][:num_steps]}
    assert _levels_queried(ctm, method.model_copy(update={"sample_sigmas": custom}), process, num_steps,
                           monkeypatch) == custom[num_steps]


def test_pcm_levels_are_phase_edges():
    process = VPProcess()
    method = pcm.PCMConfig(solver_steps=50, num_phases=4)
    edges = process.sampling_sigmas(50).double()[pcm.edge_indices(50, 4)].tolist()
    for n in (1, 2, 3, 4):
        assert set(pcm.sample_levels(method, process, n)) <= set(edges)
