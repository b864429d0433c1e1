"""caf plugin: conformance of ``caf`` (acceleration stage; GAN stage) and ``reflow`` on the three backbones with a
tiny pair store, and the maths against closed forms (consistency.md §8, distribution.md §8)."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fewstep_plugins import caf
from torch import nn

from fewstep.config import ConfigError
from fewstep.evaluation import coupling_preservation, evaluate_coupling
from fewstep.export import load_export
from fewstep.pairs import PairStore
from fewstep.plugin import build_manager
from fewstep.sampling import generate
from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_pairs, tiny_run_config
from fewstep.trainer import Trainer
from fewstep.types import Batch, Cond, Nets, OptimizerGroup, Phase, StepInfo

PROMPTS = ["zero", "one", "two", "three"]


class _OnPairs(MethodConformance):
    """The conformance tests with ``data.pairs`` set to a tiny store of the test's teacher."""

    @pytest.fixture(autouse=True)
    def _pair_store(self, teacher):
        self.pairs = tiny_pairs(teacher, prompts=PROMPTS)

    def config(self, teacher, **sections):
        data = {"pairs": str(self.pairs), **sections.pop("data", {})}
        return super().config(teacher, data=data, **sections)


class TestCAFConformance(_OnPairs):
    """Velocity phase (2 steps), then the acceleration phase with IVC (2 steps)."""

    method = {"name": "caf", "velocity_nimg": 8}


class TestCAFGanConformance(_OnPairs):
    """reflow -> velocity -> acceleration -> gan: the generator steps at step 4, the discriminator at 3, 4, 5."""

    method = {"name": "caf", "reflow_nimg": 4, "velocity_nimg": 4, "gan_nimg": 12}
    steps = 6


class TestReflowConformance(_OnPairs):
    method = {"name": "reflow"}


class TestCAFLatentConformance(_OnPairs):
    """Couplings in the VAE's latent space; samples decoded."""

    method = {"name": "caf", "velocity_nimg": 8}
    backbones = ("unet",)
    teacher_options = {"latent": True}


class TestCAFFlowTeacherConformance(_OnPairs):
    method = {"name": "caf", "velocity_nimg": 8, "distance": "l2"}
    backbones = ("unet",)
    teacher_options = {"process": "flow"}


# ---------------------------------------------------------------------------------------------
# Closed forms


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 7])
def test_sampler_is_exact_on_a_constant_acceleration_trajectory(num_steps):
    """With x_t = z + v0 t + a t²/2 and exact networks, every N-step output is x1 = z + v0 + a/2, each a_phi
    call sees the trajectory's point at t_i = i/N, and it costs N + 1 evaluations (§8.7)."""
    z, v0, a = _rand(3, 1, 4, 4, seed=1), _rand(3, 1, 4, 4, seed=2), _rand(3, 1, 4, 4, seed=3)
    calls = {"v": 0, "a": 0}

    def velocity(x, t):
        calls["v"] += 1
        assert torch.equal(x, z) and torch.equal(t, torch.zeros(3))
        return v0

    def acceleration(x, t, v):
        i = calls["a"]
        calls["a"] += 1
        assert torch.equal(v, v0) and torch.allclose(t, torch.full((3,), i / num_steps))
        ti = i / num_steps
        torch.testing.assert_close(x, z + v0 * ti + 0.5 * a * ti**2)
        return a

    out = caf.caf_sample(velocity, acceleration, z, num_steps)
    torch.testing.assert_close(out, z + v0 + 0.5 * a)
    assert calls == {"v": 1, "a": num_steps}


def test_interpolant_hits_both_ends_with_initial_velocity_and_constant_acceleration():
    """x_0 = z, x_1 = x1, dx/dt(0) = v0 and d²x/dt² = 2(x1 - z) - 2 v0 for any v0 (§8.2)."""
    z, x1, v0 = _rand(2, 1, 4, 4, seed=1), _rand(2, 1, 4, 4, seed=2), _rand(2, 1, 4, 4, seed=3)
    torch.testing.assert_close(caf.interpolant(z, x1, v0, torch.zeros(2)), z)
    torch.testing.assert_close(caf.interpolant(z, x1, v0, torch.ones(2)), x1)
    for t0 in (0.0, 0.3, 0.8):
        t = torch.full((2,), t0, requires_grad=True)
        x = caf.interpolant(z, x1, v0, t)
        (dx,) = torch.autograd.grad(x.sum(), t, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.sum(), t)
        a = caf.acceleration_target(z, x1, v0)
        torch.testing.assert_close(ddx, a.flatten(1).sum(1))  # sum over pixels of a constant second derivative
        if t0 == 0.0:
            torch.testing.assert_close(dx, v0.flatten(1).sum(1))


@pytest.mark.parametrize("h", [1.0, 1.5])
def test_a_phi_started_at_an_exact_v_theta_predicts_the_exact_acceleration(h):
    """a = 2 (u/h - v_hat): where u = v_hat = h (x1 - z) (a_phi and v_theta exact on the path), a equals the
    target 2 (x1 - z) - 2 v_hat = 2 (1 - h)(x1 - z), zero for h = 1."""
    z, x1 = _rand(2, 1, 4, 4, seed=1), _rand(2, 1, 4, 4, seed=2)
    v0 = caf.velocity_target(z, x1, h)
    a = caf.acceleration_from_velocity(v0, v0, h)
    torch.testing.assert_close(a, caf.acceleration_target(z, x1, v0))
    torch.testing.assert_close(a, 2 * (1 - h) * (x1 - z))


def test_h_one_is_rectified_flow():
    """h = 1: v0 = x1 - z, zero acceleration, the straight line x_t = t x1 + (1 - t) z and c_h(t) = t."""
    z, x1 = _rand(2, 1, 4, 4, seed=1), _rand(2, 1, 4, 4, seed=2)
    v0 = caf.velocity_target(z, x1, 1.0)
    torch.testing.assert_close(v0, x1 - z)
    assert torch.equal(caf.acceleration_target(z, x1, v0), torch.zeros_like(z))
    t = torch.tensor([0.25, 0.6])
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(caf.interpolant(z, x1, v0, t), tt * x1 + (1 - tt) * z)
    torch.testing.assert_close(caf.path_level(t, 1.0), t)


@pytest.mark.parametrize("h", [0.5, 1.5, 2.0])
def test_exact_initial_velocity_keeps_the_interpolant_on_the_line_at_level_c_h(h):
    """With v0 = h (x1 - z), x_t = c x1 + (1 - c) z with c = h t + (1 - h) t², monotone from 0 to 1 for h <= 2:
    the level the networks are read at (module docstring)."""
    z, x1 = _rand(2, 1, 4, 4, seed=1), _rand(2, 1, 4, 4, seed=2)
    t = torch.linspace(0, 1, 11)
    c = caf.path_level(t, h)
    assert c[0] == 0 and c[-1] == 1 and (c[1:] >= c[:-1]).all()
    for ti, ci in zip(t, c):
        x = caf.interpolant(z, x1, caf.velocity_target(z, x1, h), ti.repeat(2))
        torch.testing.assert_close(x, ci * x1 + (1 - ci) * z)


def test_coupling_preservation_on_known_errors():
    """Per-sample errors 0.1 and 0.2 on [-1, 1] data: MSE 0.01 / 0.04, PSNR 10 log10(4/0.01) = 26.02 dB and
    10 log10(4/0.04) = 20 dB; the metric averages both over samples."""
    target = torch.zeros(2, 1, 4, 4)
    samples = target + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    got = coupling_preservation(samples, target)
    assert got["mse"] == pytest.approx(0.025)
    assert got["psnr"] == pytest.approx((10 * math.log10(400) + 20.0) / 2, abs=1e-4)
    assert coupling_preservation(samples[:1], target[:1], data_range=1.0)["psnr"] == pytest.approx(20.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The velocity map of a teacher copy, the IVC input, the schedule and the hand-over


@pytest.mark.parametrize("process,prediction", [("vp", "v_prediction"), ("edm", None)])
def test_a_teacher_copy_is_the_teachers_probability_flow(tmp_path, process, prediction):
    """Read through flow_output, the teacher's network is its PF-ODE in rectified-flow coordinates (a flow
    teacher: see the next test, exactly its own velocity): Euler
    steps of it converge to the teacher's own 32-step Heun solution from the same noise (first order: 8x the
    steps, about 64x smaller squared error)."""
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", process=process, prediction_type=prediction))
    z = _rand(2, 1, 8, 8)
    reference = teacher.sample(z, None, num_steps=32, decode=False)
    with torch.no_grad():
        errors = [coupling_preservation(caf.euler_sample(
            lambda x, t: caf.flow_output(teacher.net, teacher.process, x, t, 1.0, None), z, n), reference)
            for n in (8, 64)]
    assert errors[1]["mse"] < errors[0]["mse"] / 8
    assert errors[1]["psnr"] > 35


def test_flow_output_of_a_flow_teacher_is_its_negated_velocity(tmp_path):
    """For a flow-matching teacher (x_s = (1 - s) x1 + s z, velocity z - x1) CAF time t is s = 1 - t."""
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", process="flow"))
    x, t = _rand(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        own = teacher.net(x, (1 - t) * teacher.process.num_train_timesteps)
        torch.testing.assert_close(caf.flow_output(teacher.net, teacher.process, x, t, 1.0, None), -own,
                                   rtol=1e-4, atol=1e-4)


class _Recording(nn.Module):
    """Calls a backbone and records the IVC input it was given."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, timestep, cond=None, **kwargs):
        self.seen.append(kwargs.get("extra_input"))
        return self.net(x, timestep, cond, **kwargs)


def _step(batch: int) -> StepInfo:
    return StepInfo(step=0, nimg=0, total_nimg=8, phase="acceleration", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(0), local_batch=batch, global_batch=batch)


def test_ivc_input_is_the_stop_gradient_initial_velocity(tmp_path):
    """a_phi is fed v_hat = sg[v_theta(z, 0)] (§8.4): equal to the velocity network's output at t = 0 for the
    pair's noise, without a graph, and no gradient reaches the velocity network."""
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet", prediction_type="v_prediction"))
    student = copy.deepcopy(teacher.net).float()
    student.add_input_channels(1)
    with torch.no_grad():  # distinct weights, and IVC channels that matter
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    velocity = copy.deepcopy(student).requires_grad_(True)
    recording = _Recording(student)
    cfg = caf.CAFConfig(name="caf")
    nets = Nets(teacher, recording, {"velocity": velocity})
    z, x1 = _rand(3, 1, 8, 8, seed=1), _rand(3, 1, 8, 8, seed=2)
    batch = Batch(x0=None, cond=Cond(), pairs=(z, x1), pair_cond=Cond())
    group = OptimizerGroup("acceleration", ("student",), lr=1e-4)
    out = caf.fewstep_loss(SimpleNamespace(method=cfg), group, batch, nets, _step(3))
    out.loss.mean().backward()
    (ivc,) = recording.seen
    expected = caf.flow_output(velocity, teacher.process, z, torch.zeros(3), cfg.h, Cond())
    torch.testing.assert_close(ivc, expected)
    assert not ivc.requires_grad
    assert all(p.grad is None for p in velocity.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_phases_split_the_run_as_configured():
    total = 100
    assert caf.caf_phases(caf.CAFConfig(name="caf"), total) == [("velocity", 50), ("acceleration", 50)]
    cfg = caf.CAFConfig(name="caf", reflow_nimg=10, gan_nimg=20)
    assert caf.caf_phases(cfg, total) == [("reflow", 10), ("velocity", 35), ("acceleration", 35), ("gan", 20)]
    cfg = caf.CAFConfig(name="caf", reflow_nimg=30, velocity_nimg=0)  # reflow instead of the velocity phase
    assert caf.caf_phases(cfg, total) == [("reflow", 30), ("acceleration", 70)]


def test_configuration_errors_name_the_fields(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    with pytest.raises((ConfigError, ValueError), match="data.pairs"):
        _setup(tiny_run_config(teacher, {"name": "reflow"}), tmp_path / "a")
    pairs = {"pairs": str(tmp_path / "p")}
    with pytest.raises((ConfigError, ValueError), match="acceleration phase"):
        _setup(tiny_run_config(teacher, {"name": "caf", "velocity_nimg": 12}, steps=3, data=pairs), tmp_path / "b")
    with pytest.raises((ConfigError, ValueError), match="never trained"):
        _setup(tiny_run_config(teacher, {"name": "caf", "velocity_nimg": 0}, data=pairs), tmp_path / "c")


def _setup(config, run_dir: Path) -> Trainer:
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable)
    trainer = Trainer(config, pm, run_dir)
    trainer.setup()
    return trainer


def test_end_of_the_velocity_stage_hands_v_theta_over(tmp_path):
    """velocity and the student (a_phi's start) both become the sampling network (the EMA), only at the end
    of the last velocity-stage phase."""
    teacher = load_teacher(make_tiny_teacher(tmp_path / "t", "unet"))
    student = copy.deepcopy(teacher.net)
    ema, velocity = copy.deepcopy(student), copy.deepcopy(student)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    nets = Nets(teacher, student, {"ema": ema, "velocity": velocity})
    ctx = SimpleNamespace(method=caf.CAFConfig(name="caf", reflow_nimg=4), config=SimpleNamespace(
        train=SimpleNamespace(total_nimg=16)))
    for ended in ("reflow", "acceleration"):
        caf.fewstep_on_phase_end(ctx, Phase(ended, ("velocity",), 4), nets)
        assert not torch.equal(velocity.model.conv_in.weight, ema.model.conv_in.weight)
    caf.fewstep_on_phase_end(ctx, Phase("velocity", ("velocity",), 6), nets)
    for net in (velocity, student):
        for a, b in zip(net.parameters(), ema.parameters()):
            assert torch.equal(a, b)


def test_coupling_of_the_teacher_is_preserved_by_reflow_at_step_zero(tmp_path):
    """evaluate_coupling (the benchmark's metric) on a class-conditional run before training: reflow's Euler
    sampler is the teacher's ODE, so it reproduces the stored pairs better with more steps."""
    teacher = make_tiny_teacher(tmp_path / "t", "unet", conditioning="class", prediction_type="v_prediction")
    pairs = tiny_pairs(teacher, num=4, num_steps=32, prompts=PROMPTS)
    trainer = _setup(tiny_run_config(teacher, {"name": "reflow"}, data={"pairs": str(pairs)}), tmp_path / "run")
    got = evaluate_coupling(trainer.pm.hook, trainer.ctx, trainer.nets, PairStore(pairs), [2, 64], num=4)
    assert got[64]["psnr"] > got[2]["psnr"] + 10 and got[64]["psnr"] > 35


def test_the_export_carries_the_velocity_network(tmp_path):
    """A loaded CAF export restores ``velocity`` next to a_phi and samples what the run's sampler samples."""
    teacher = make_tiny_teacher(tmp_path / "t", "unet", prediction_type="v_prediction")
    config = tiny_run_config(teacher, {"name": "caf", "velocity_nimg": 8}, steps=4,
                             data={"pairs": str(tiny_pairs(teacher, prompts=PROMPTS))})
    trainer, _ = run_tiny(config, tmp_path / "run")
    loaded = load_export(tmp_path / "run" / "export")
    assert set(loaded.nets.extra) == {"velocity"}
    noise = _rand(3, 1, 8, 8, seed=5)
    for k in (1, 2):
        expected = generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, None, k)
        torch.testing.assert_close(generate(loaded.hook, loaded.ctx, loaded.nets, noise, None, k), expected)


def test_acceleration_after_a_reflow_only_velocity_stage_needs_h_one(tmp_path):
    """Without a velocity phase v_theta is the reflow (h = 1) velocity; a_phi must then be read with h = 1."""
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    method = {"name": "caf", "h": 1.5, "reflow_nimg": 4, "velocity_nimg": 0}
    with pytest.raises(ValueError, match="set method.h: 1.0"):
        run_tiny(tiny_run_config(teacher, method, steps=2, data={"pairs": str(tmp_path / "missing")}), tmp_path / "r")


def test_coupling_command_writes_the_summary(tmp_path, capsys):
    """`fewstep coupling RUN PAIRS`: the same numbers as evaluate_coupling, merged into RUN/summary.json."""
    import json

    from fewstep import cli
    from fewstep.config import write_resolved

    teacher = make_tiny_teacher(tmp_path / "t", "unet", prediction_type="v_prediction")
    pairs = tiny_pairs(teacher, num=4, num_steps=8, prompts=PROMPTS)
    config = tiny_run_config(teacher, {"name": "reflow"}, steps=1, data={"pairs": str(pairs)})
    trainer, _ = run_tiny(config, tmp_path / "run")
    write_resolved(config, tmp_path / "run")
    assert cli.main(["coupling", str(tmp_path / "run"), str(pairs), "--steps", "1", "8", "--num", "4"]) == 0
    block = json.loads((tmp_path / "run" / "summary.json").read_text())["coupling"]
    direct = evaluate_coupling(trainer.pm.hook, trainer.ctx, trainer.nets, PairStore(pairs), [1, 8], num=4)
    assert block["num"] == 4 and block["student 8 steps"]["psnr"] == pytest.approx(direct[8]["psnr"], abs=1e-3)
    assert "PSNR" in capsys.readouterr().out
