"""lowdiff plugin and fewstep.cascade: conformance, closed forms of the cascade maths, training, sampling, export,
and distillation of every stage by an existing method (cd), through the stage teachers of the export."""

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fewstep_plugins import lowdiff

from fewstep import cascade
from fewstep.diffusion import karras_sigmas, sample_ode
from fewstep.export import load_export
from fewstep.imagecond import ImageCondition
from fewstep.sampling import generate
from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_run_config
from fewstep.types import Batch, Cond, Nets, StepInfo


class TestLowDiffConformance(MethodConformance):
    method = {"name": "lowdiff", "resolutions": [4, 8], "solver": "euler"}

    def config(self, teacher, **sections):
        """A two-stage cascade [S/2, S] ending at the teacher's model-space size S (8 for the tiny pixel teachers,
        16 for the tiny latent family pipelines)."""
        from fewstep.data_config import teacher_info

        info = teacher_info(teacher)
        size = info.data_shape[-1] // info.vae_factor
        return tiny_run_config(teacher, {**self.method, "resolutions": [size // 2, size]}, steps=self.steps,
                               batch=self.batch, **sections)


@pytest.fixture(scope="module")
def teacher16(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher16"), "unet", conditioning="class", sample_size=16)


def _step(batch: int, seed: int = 0) -> StepInfo:
    return StepInfo(step=0, nimg=0, total_nimg=batch, phase="train", phase_progress=0.0, progress=0.0,
                    generator=torch.Generator().manual_seed(seed), local_batch=batch, global_batch=batch)


def _ctx(**method):
    config = lowdiff.LowDiffConfig(**{"name": "lowdiff", **method})
    return SimpleNamespace(method=config, config=SimpleNamespace(teacher=SimpleNamespace(guidance=1.0)),
                           device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------ closed forms


def test_resolution_operators():
    x = torch.randn(3, 2, 8, 8)
    low = cascade.downsample(x, 2)
    assert torch.allclose(low[:, :, 1, 0], x[:, :, 4:8, 0:4].mean((-2, -1)))
    up = cascade.upsample(low, 8)  # nearest: each 4x4 block holds its mean, and down-sampling undoes it
    assert torch.equal(up[:, :, 4:8, 0:4], low[:, :, 1:2, 0:1].expand(-1, -1, 4, 4))
    assert torch.allclose(cascade.downsample(up, 2), low)
    assert cascade.upsample(low, 8, "bilinear").shape == (3, 2, 8, 8)
    noise = cascade.pooled_noise(torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(0)), 2)
    assert abs(noise.std().item() - 1.0) < 0.02 and abs(noise.mean().item()) < 0.02


def test_condition_is_the_upsampled_lowres_image_and_zero_at_stage_0():
    x0 = torch.randn(2, 1, 16, 16)
    res = [4, 8, 16]
    assert torch.equal(cascade.lowres_condition(x0, res, 0), torch.zeros(2, 1, 4, 4))
    cond = cascade.lowres_condition(x0, res, 2)
    expected = x0.reshape(2, 1, 8, 2, 8, 2).mean((3, 5)).repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert torch.allclose(cond, expected, atol=1e-6)
    assert torch.allclose(cascade.lowres_condition(x0, res, 1), cascade.upsample(cascade.downsample(x0, 4), 8))


def test_resolutions_and_stage_steps_are_checked():
    assert cascade.check_resolutions([4, 8, 16], 16) == [4, 8, 16]
    for bad in ([8, 4], [4, 6], []):
        with pytest.raises(ValueError, match="resolutions"):
            cascade.check_resolutions(bad)
    with pytest.raises(ValueError, match="make the last resolution 32"):
        cascade.check_resolutions([8, 16], 32)
    assert cascade.stage_steps(16, 3, 0.5, {}) == [16, 8, 4]
    assert cascade.stage_steps(1, 3, 0.5, {}) == [1, 1, 1]
    assert cascade.stage_steps(16, 3, 0.5, {16: [12, 3, 1]}) == [12, 3, 1]
    with pytest.raises(ValueError, match="give 3 counts"):
        cascade.stage_steps(16, 3, 0.5, {16: [12, 3]})
    assert lowdiff._resolutions(lowdiff.LowDiffConfig(), 16) == [4, 8, 16]


def test_cascade_runs_each_stage_at_its_size_on_the_previous_output():
    calls = []

    def denoise(x, sigma, low, k):
        calls.append((k, x.shape[-1], low.shape[-1], float(sigma[0])))
        return low + k + 1.0  # a "denoiser" whose clean estimate is the condition plus a stage mark

    sigmas = lambda n: torch.linspace(10.0, 0.0, n + 1, dtype=torch.float64)  # noqa: E731
    out = cascade.cascade_sample(denoise, torch.randn(2, 1, 16, 16), [4, 8, 16], [3, 2, 1], sigmas, solver="euler")
    assert out.shape == (2, 1, 16, 16)
    assert [(k, r, lr) for k, r, lr, _ in calls] == [(0, 4, 4)] * 3 + [(1, 8, 8)] * 2 + [(2, 16, 16)]
    # Euler to sigma 0 returns the last estimate: stage 0 gives 1, stage 1 gives 1 + 2, stage 2 gives 3 + 3
    assert torch.allclose(out, torch.full_like(out, 6.0))


def test_cascade_feeds_stage_students_their_noise_and_condition():
    """A stage with a student skips the ODE: the student gets the stage's noise and the previous output up-sampled
    (zeros at stage 0), and its sample is what the next stage reads."""
    seen = {}

    def student(k):
        def sample(noise, low):
            seen[k] = (noise.shape[-1], low.clone())
            return low + 10.0 ** k
        return sample

    denoise = lambda x, sigma, low, k: low + 100.0  # noqa: E731 - the ODE stage: clean estimate low + 100
    sigmas = lambda n: torch.linspace(10.0, 0.0, n + 1, dtype=torch.float64)  # noqa: E731
    out = cascade.cascade_sample(denoise, torch.randn(2, 1, 16, 16), [4, 8, 16], [2, 2, 2], sigmas, solver="euler",
                                 students={0: student(0), 2: student(2)})
    assert seen[0][0] == 4 and torch.equal(seen[0][1], torch.zeros(2, 1, 4, 4))
    assert seen[2][0] == 16 and torch.allclose(seen[2][1], torch.full((2, 1, 16, 16), 101.0))  # 1, then + 100
    assert torch.allclose(out, torch.full_like(out, 201.0))


def test_stages_from_start_sigma_end_with_an_euler_step_from_above_sigma_min():
    """A stage started from the noised up-sample takes the first n levels of an (n+1)-level Karras grid from
    start_sigma to sigma_min, then 0: no Heun corrector at sigma_min (there a 2-step stage from 2.0 multiplied the
    denoiser's last change by (2.0 - 0.01) / (2 * 0.01) ~ 100) and no wasted step from sigma_min to 0."""
    for n in (1, 2, 4):
        sigmas = cascade.stage_sigmas(lambda m: torch.zeros(m + 1), n, 2.0, 0.01)
        torch.testing.assert_close(sigmas, torch.cat([karras_sigmas(n + 1, 0.01, 2.0)[:-1], torch.zeros(1)]).double())
        assert sigmas[0] == 2.0 and sigmas[-1] == 0.0 and sigmas[-2] > 0.05  # 2 steps: 2.0 -> 0.23 -> 0
    levels = []

    def denoise(x, sigma, low, k):
        """Data +-1 per pixel, exact posterior mean, through a network whose noise estimate is bounded by 4 (as a
        trained network's output is): near sigma -> 0 it is close to the identity on off-data inputs."""
        levels.append(float(sigma[0]))
        s = sigma.view(-1, 1, 1, 1)
        return x - s * ((x - torch.tanh(x / s**2)) / s).clamp(-4, 4)

    signs = torch.where(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    off = {}
    for n in (2, 3):
        levels.clear()
        out = cascade.cascade_sample(denoise, torch.randn(64, 1, 8, 8), [8, 8], [1, n], None, solver="heun",
                                     start_sigma=2.0, sigma_min=0.01, generator=torch.Generator().manual_seed(1),
                                     students={0: lambda noise, low: signs})
        assert min(levels) > 0.09  # never at sigma_min = 0.01 (before: the corrector and the last step were)
        off[n] = out.abs().max().item(), ((out.abs() - 1).abs() > 0.05).float().mean().item()
    assert off[2][0] < 3.0  # before: 7.7, the +-6 samples of docs/LOWDIFF.md in miniature
    assert off[3][1] == 0.0  # 3 steps land every pixel on the data (before: 92 % off, as 2 steps now)


def test_stage_teachers_are_the_unified_model_at_their_stage(teacher16):
    """stage_teacher(k) called like any teacher (no stage input; the condition in Cond.image at stage k >= 1, none at
    stage 0) is the unified model at stage k, with a trained stage embedding and condition channels."""
    teacher = load_teacher(teacher16)
    method = lowdiff.LowDiffConfig(resolutions=[4, 8, 16], cond_noise=0.2, upsampling="bilinear")
    model = lowdiff.fewstep_build_student(_ctx(resolutions=[4, 8, 16]), teacher).eval()
    with torch.no_grad():
        for p in [*model.scalar_embeddings["stage"].parameters(), model.model.conv_in.weight]:
            p.add_(0.1 * torch.randn_like(p))
    t, cond = torch.tensor([20.0, 700.0]), Cond(labels=torch.tensor([3, 7]))
    for k, r in enumerate([4, 8, 16]):
        stage, condition = lowdiff.stage_teacher(method, model, k)
        x, low = torch.randn(2, 1, r, r), torch.randn(2, 1, r, r)
        with torch.no_grad():
            if k == 0:
                assert condition is None and stage.image_channels == 0 and stage.sample_size == 4
                ref = model(x, t, cond.with_image(torch.zeros_like(x)), stage=cascade.stage_input(0))
                assert torch.equal(stage(x, t, cond), ref)
            else:
                assert condition == ImageCondition("lowres", [4, 8][k - 1], "bilinear", 0.2)
                assert stage.scalar_defaults == {"stage": 250.0 * k} and stage.sample_size == r
                ref = model(x, t, cond.with_image(low), stage=cascade.stage_input(k))
                assert torch.equal(stage(x, t, cond.with_image(low)), ref)
                with pytest.raises(ValueError, match="image-conditioned"):
                    stage(x, t, cond)
    assert model.image_channels == 1 and "stage" not in model.scalar_defaults  # the model itself is unchanged


def test_a_model_saved_before_cond_image_reads_its_condition_from_cond_image(teacher16):
    """Exports written when the condition came through extra_input hold the same channels: they are relabelled."""
    teacher = load_teacher(teacher16)
    old = copy.deepcopy(teacher.net)
    old.add_input_channels(1)
    old.add_scalar_inputs(["stage"])
    with torch.no_grad():
        old.model.conv_in.weight[:, 1:].normal_()
        x, t, low = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 50.0]), torch.randn(2, 1, 16, 16)
        before = old(x, t, Cond(labels=torch.tensor([1, 2])), extra_input=low, stage=torch.full((2,), 250.0))
        student = lowdiff.fewstep_build_student(_ctx(), SimpleNamespace(net=old, source="old"))
        after = student(x, t, Cond(labels=torch.tensor([1, 2]), image=low), stage=torch.full((2,), 250.0))
    assert student.image_channels == 1 and torch.equal(before, after)


def test_stage_input_and_student_starts_as_its_teacher(teacher16):
    teacher = load_teacher(teacher16)
    student = lowdiff.fewstep_build_student(_ctx(), teacher)
    assert student.extra_channels == student.image_channels == 1 and student.extra_scalars == ("stage",)
    assert torch.equal(cascade.stage_input(2), torch.tensor(500.0))
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]), Cond(labels=torch.tensor([1, 2]))
    with torch.no_grad():
        ref = teacher.net(x, t, cond)
        assert torch.allclose(student(x, t, cond.with_image(torch.randn(2, 1, 8, 8)), stage=cascade.stage_input(1)),
                              ref, atol=1e-5)
        for p in student.scalar_embeddings["stage"].mlp.linear_2.parameters():
            p.normal_()
        outs = [student(x, t, cond.with_image(torch.zeros(2, 1, 8, 8)), stage=cascade.stage_input(k)) for k in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_loss_feeds_the_exact_condition_and_stage(teacher16):
    teacher = load_teacher(teacher16)
    ctx = _ctx(stage_probs=[0.0, 0.0, 1.0], cond_noise=0.0)
    student = lowdiff.fewstep_build_student(ctx, teacher)
    seen = {}
    student.model.conv_in.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    student.scalar_embeddings["stage"].register_forward_pre_hook(lambda m, args: seen.update(stage=args[0]))
    x0 = torch.randn(3, 1, 16, 16)
    batch = Batch(x0=x0, cond=Cond(labels=torch.tensor([0, 1, 2])), uncond=Cond(labels=torch.full((3,), 10)))
    out = lowdiff.fewstep_loss(ctx, None, batch, Nets(teacher, student), _step(3))
    assert out.loss.shape == (3,) and torch.isfinite(out.loss).all()
    assert seen["x"].shape == (3, 2, 16, 16)
    assert torch.allclose(seen["x"][:, 1:], cascade.upsample(cascade.downsample(x0, 8), 16))
    assert torch.equal(seen["stage"], torch.full((3,), 500.0))


def test_single_stage_sampler_is_the_plain_sampler(teacher16):
    """With one stage the condition is empty: the cascade is the model's own ODE sampler, and at initialisation
    (zero-initialised channels and stage embedding) the teacher's."""
    teacher = load_teacher(teacher16)
    ctx = _ctx(resolutions=[16], solver="heun")
    student = lowdiff.fewstep_build_student(ctx, teacher).eval()
    noise, cond = torch.randn(2, 1, 16, 16), Cond(labels=torch.tensor([3, 4]))
    with torch.no_grad():
        out = lowdiff.fewstep_sample(ctx, Nets(teacher, student), noise, cond, 4, torch.Generator())
        sigmas = teacher.process.sampling_sigmas(4)
        empty = cond.with_image(torch.zeros_like(noise))  # stage 0 reads a zero condition image
        plain = sample_ode(lambda x, s: teacher.process.denoise(student, x, s, empty), noise * sigmas[0], sigmas, "heun")
        ref = teacher.sample(noise, cond, num_steps=4, solver="heun")
    assert torch.equal(out, plain)
    assert torch.allclose(out, ref, atol=1e-4)


# ---------------------------------------------------------------------------------- training and sampling


def test_training_on_digits_lowers_every_stage_loss(teacher16, tmp_path):
    method = {"name": "lowdiff", "resolutions": [4, 8, 16], "solver": "euler", "p_uncond": 0.0}
    config = tiny_run_config(teacher16, method, steps=30, batch=16, data={"resolution": 16}, optimizer={"lr": 2e-3})
    trainer, _ = run_tiny(config, tmp_path / "run")
    teacher = trainer.nets.teacher
    x0, _, _ = trainer.dataset.get(torch.arange(48))
    batch = Batch(x0=x0.float(), cond=Cond(labels=torch.zeros(48, dtype=torch.long)))
    before = lowdiff.fewstep_build_student(_ctx(), teacher)
    for k in range(3):
        ctx = _ctx(stage_probs=[float(i == k) for i in range(3)], p_uncond=0.0)
        with torch.no_grad():
            new = lowdiff.fewstep_loss(ctx, None, batch, Nets(teacher, trainer.nets.student), _step(48, 1)).loss.mean()
            old = lowdiff.fewstep_loss(ctx, None, batch, Nets(teacher, before), _step(48, 1)).loss.mean()
        assert new < old, (k, float(new), float(old))


@pytest.fixture(scope="module")
def lowdiff_export(teacher16, tmp_path_factory):
    """The export of a 2-step lowdiff run of the 16x16 teacher with stages [8, 16]."""
    run = tmp_path_factory.mktemp("lowdiff")
    run_tiny(tiny_run_config(teacher16, {"name": "lowdiff", "resolutions": [8, 16], "solver": "euler"}, steps=2,
                             batch=4, data={"resolution": 16}), run)
    return run / "export"


def _cascade(export, students: dict[int, str], num_steps: int = 2) -> torch.Tensor:
    """The export's cascade with ``method.stage_students``, on 2 class-conditional samples."""
    loaded = load_export(export)
    ctx = dataclasses.replace(loaded.ctx, method=loaded.ctx.method.model_copy(update={"stage_students": students}))
    return generate(loaded.hook, ctx, loaded.nets, torch.randn(2, 1, 16, 16), Cond(labels=torch.tensor([0, 1])),
                    num_steps)


def test_export_samples_the_cascade_and_holds_a_base_teacher_cd_distils(lowdiff_export, tmp_path):
    images = _cascade(lowdiff_export, {})
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    base = load_teacher(lowdiff_export / lowdiff.BASE_TEACHER)
    assert base.sample_shape == (1, 8, 8) and base.net.extra_scalars == ("stage",) and base.image_condition is None
    # the lowest stage as a plain teacher: cd distils it at 8x8, and the cascade then samples stage 0 with it
    run_tiny(tiny_run_config(lowdiff_export / lowdiff.BASE_TEACHER, {"name": "cd"}, steps=2, batch=4,
                             data={"resolution": 8}), tmp_path / "cd")
    images = _cascade(lowdiff_export, {0: str(tmp_path / "cd" / "export")}, num_steps=1)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="samples at 8, the cascade's stage 1 at 16"):
        _cascade(lowdiff_export, {1: str(tmp_path / "cd" / "export")})


def test_cd_distils_stage_k_conditioned_on_c_k_and_the_cascade_samples_with_it(lowdiff_export, tmp_path):
    """stage_teachers/1 (16x16, conditioned on c_1 made from the data): cd distils it without knowing LowDiff, its
    student starts as the stage teacher, and the cascade samples stage 1 with the student."""
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    top = load_teacher(lowdiff_export / lowdiff.stage_folder(1))
    assert top.sample_shape == (1, 16, 16) and top.image_condition == ImageCondition("lowres", 8, "nearest", 0.1)
    config = tiny_run_config(lowdiff_export / lowdiff.stage_folder(1), {"name": "cd"}, steps=2, batch=4,
                             data={"resolution": 16})
    fresh = Trainer(config, build_manager("cd"), tmp_path / "setup")
    fresh.setup()
    batch = fresh.batch(0)
    x, t = torch.randn(4, 1, 16, 16), torch.full((4,), 300.0)
    with torch.no_grad():
        assert torch.equal(fresh.nets.student(x, t, batch.cond), top.net(x, t, batch.cond))
    _, recorder = run_tiny(config, tmp_path / "cd")
    losses = [log["student/loss"] for log in recorder.logs if "student/loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    student = str(tmp_path / "cd" / "export")
    images = _cascade(lowdiff_export, {1: student})
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    ctx = SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="not a student of stage 0"):
        lowdiff._stage_sampler(ctx, 0, Path(student), 16, None, 1, torch.Generator())


def test_configure_refuses_a_missing_teacher_and_mismatched_stage_probs(teacher16):
    with pytest.raises(ValueError, match="teacher.pretrained"):
        lowdiff.fewstep_configure(tiny_run_config(None, {"name": "lowdiff"}))
    with pytest.raises(ValueError, match="one probability per stage"):
        lowdiff.fewstep_configure(tiny_run_config(teacher16, {"name": "lowdiff", "resolutions": [8, 16],
                                                              "stage_probs": [1.0]}))
    with pytest.raises(ValueError, match="give one of them"):
        lowdiff.fewstep_configure(tiny_run_config(teacher16, {"name": "lowdiff", "base_student": "a",
                                                              "stage_students": {0: "b"}}))
    with pytest.raises(ValueError, match="stages are numbered 0"):
        lowdiff.fewstep_configure(tiny_run_config(teacher16, {"name": "lowdiff", "resolutions": [8, 16],
                                                              "stage_students": {2: "b"}}))
