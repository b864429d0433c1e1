"""Foreign DDPM teachers (issue 14): a stock diffusers DDPM folder with x0 clipping, sampled, distilled and
exported by fewstep as stock diffusers would treat it."""

import json

import numpy as np
import pytest
import torch

from fewstep.diffusion import VPProcess, X0Clip, process_from_scheduler_config
from fewstep.teacher import load_teacher
from fewstep.testing import tiny_unet


def stock_ddpm_folder(folder, **scheduler):
    """A tiny DDPMPipeline folder written by stock diffusers (DDPM epsilon, linear betas, clip_sample on)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(0)
    unet = tiny_unet(8, 1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**{"clip_sample": True, **scheduler})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    return stock_ddpm_folder(tmp_path_factory.mktemp("ddpm") / "teacher")


def test_scheduler_clip_settings_round_trip() -> None:
    """clip_sample / thresholding are read with diffusers' class defaults and written back, not dropped."""
    assert process_from_scheduler_config({"_class_name": "DDPMScheduler"}).x0_clip.clip_sample  # diffusers default
    assert not process_from_scheduler_config({"_class_name": "LCMScheduler"}).x0_clip.active
    cfg = {"_class_name": "DDIMScheduler", "clip_sample": False, "thresholding": True,
           "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0}
    process = process_from_scheduler_config(cfg)
    assert process.x0_clip == X0Clip(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    assert process_from_scheduler_config(process.scheduler_config()).x0_clip == process.x0_clip
    assert "thresholded" in process.describe()
    assert VPProcess().scheduler_config()["clip_sample"] is False


@pytest.mark.parametrize("settings", [dict(clip_sample=True, clip_sample_range=0.5),
                                      dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
def test_x0_clip_equals_diffusers(settings) -> None:
    """X0Clip is step 4 of diffusers' DDIMScheduler.step (clamp, or Imagen's dynamic thresholding)."""
    from diffusers import DDIMScheduler

    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.5
    ref = DDIMScheduler(**settings)
    expected = ref._threshold_sample(x0) if ref.config.thresholding else x0.clamp(-ref.config.clip_sample_range,
                                                                                   ref.config.clip_sample_range)
    torch.testing.assert_close(X0Clip(**settings)(x0), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_teacher_ddim_equals_stock_ddim_with_clipping(ddpm, num_steps) -> None:
    """fewstep's teacher sampler (solver ddim, trailing grid) on a stock clip_sample DDPM folder equals stock
    diffusers' DDIMScheduler loop and DDIMPipeline from the same noise; clipping changes the result here."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    teacher = load_teacher(ddpm)
    assert teacher.process.x0_clip.clip_sample and teacher.process.prediction_type == "epsilon"
    noise = torch.randn(4, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    ours = teacher.sample(noise, num_steps=num_steps, solver="ddim")

    unet = UNet2DModel.from_pretrained(ddpm / "unet")
    scheduler = DDIMScheduler.from_pretrained(ddpm / "scheduler", timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)

    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    gen = torch.Generator().manual_seed(1)
    images = pipe(batch_size=4, generator=gen, num_inference_steps=num_steps, eta=0.0, output_type="np").images
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours_np, images, rtol=0, atol=2e-4)

    unclipped = load_teacher(ddpm)
    unclipped.process.x0_clip = X0Clip()
    free = unclipped.sample(noise, num_steps=num_steps, solver="ddim")
    assert (free - ours).abs().max() > 0.5  # clipping is active: without it the samples differ
    assert ours.abs().max() <= 1.0 + 1e-5 if num_steps == 1 else True


def test_teacher_targets_use_the_bounded_x0(ddpm) -> None:
    """Teacher.denoise returns the clipped x0 (methods' targets); clip=False the network's own."""
    teacher = load_teacher(ddpm)
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(2)) * teacher.process.sigma_max
    raw = teacher.denoise(x, teacher.process.sigma_max, clip=False)
    assert raw.abs().max() > 1.0
    torch.testing.assert_close(teacher.denoise(x, teacher.process.sigma_max), raw.clamp(-1, 1))


def test_pairs_and_export_keep_clipping(ddpm, tmp_path) -> None:
    """`fewstep pairs` integrates with the clipped sampler; a student's export keeps clip_sample: true."""
    from fewstep.pairs import PairStore, generate_pairs
    from fewstep.testing import run_tiny, tiny_run_config

    out = generate_pairs(load_teacher(ddpm), tmp_path / "pairs", num=4, num_steps=2, solver="ddim", shard_size=4)
    store = PairStore(out)
    assert float(store.x0.abs().max()) <= 1.0 + 1e-5 and "x0 clipped" in store.manifest["process"]
    config = tiny_run_config(ddpm, {"name": "cd"}, steps=1)
    run_tiny(config, tmp_path / "run")
    scheduler = json.loads((tmp_path / "run" / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is True


def test_train_stock_ddpm_example_smoke(tmp_path, capsys) -> None:
    """examples/train_stock_ddpm.py (stock diffusers only) trains two steps on a tiny idx file and writes a
    DDPMPipeline folder that fewstep loads as an epsilon, linear-beta, clip_sample teacher."""
    import ast
    import gzip
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "train_stock_ddpm.py"
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(script.read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert "fewstep" not in imported and {"torch", "diffusers"} <= imported
    pixels = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    idx = tmp_path / "images-idx3-ubyte.gz"
    header = b"".join(v.to_bytes(4, "big") for v in (2051, 8, 28, 28))
    idx.write_bytes(gzip.compress(header + pixels.tobytes()))
    spec = importlib.util.spec_from_file_location("train_stock_ddpm", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.testing.assert_close(module.read_idx_images(idx)[3, 0],
                               torch.from_numpy(pixels[3].astype(np.float32) / 127.5 - 1.0))
    out = module.main(["--data", str(idx), "--out", str(tmp_path / "ddpm"), "--nimg", "8", "--batch", "4"])
    teacher = load_teacher(out)
    process = teacher.process
    assert (process.kind, process.prediction_type, process.beta_schedule) == ("vp", "epsilon", "linear")
    assert process.x0_clip.clip_sample and teacher.sample_shape == (1, 16, 16)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    # Stopped after step 1 (its resumable save), then re-run longer: the same weights as the uninterrupted run.
    cut = tmp_path / "cut"
    module.main(["--data", str(idx), "--out", str(cut), "--nimg", "4", "--batch", "4"])
    assert torch.load(cut / "train_state.pt", weights_only=False)["step"] == 1
    capsys.readouterr()
    module.main(["--data", str(idx), "--out", str(cut), "--nimg", "8", "--batch", "4", "--log-every", "1"])
    log = capsys.readouterr().out
    assert "resumed" in log and "at step 1/2" in log and "step 1/2 loss" not in log and "step 2/2 loss" in log
    from diffusers import UNet2DModel

    whole = dict(UNet2DModel.from_pretrained(out / "unet").named_parameters())
    for name, p in UNet2DModel.from_pretrained(cut / "unet").named_parameters():
        torch.testing.assert_close(p, whole[name], msg=name)


# ------------------------------------------------------------------------------------------------
# Student conditioning (docs/CONDITIONING.md)


def _perturbed(backbone, delta):
    """A forward hook adding ``delta`` to the diffusers model's raw output (a network error of size delta)."""
    def hook(module, args, kwargs, output):
        return (output[0] + delta,) if isinstance(output, tuple) else type(output)(sample=output.sample + delta)
    return backbone.model.register_forward_hook(hook, with_kwargs=True)


def test_x0_gain_closed_forms() -> None:
    """|d x0 / d out| per parameterisation; DDPM's linear betas: 157 at t = 999, SD's scaled-linear: 14.6."""
    from fewstep.backbones import AUTO_CAP_SIGMA, student_sigma_cap, x0_gain
    from fewstep.diffusion import EDMProcess, FlowProcess

    linear, sd = VPProcess(), VPProcess(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert x0_gain(linear, linear.sigma_max) == pytest.approx(157.4, abs=0.1)
    assert x0_gain(sd, sd.sigma_max) == pytest.approx(14.6, abs=0.1)
    assert x0_gain(VPProcess(prediction_type="v_prediction"), linear.sigma_max) < 1
    assert x0_gain(EDMProcess(), 80.0) < 0.5 and x0_gain(FlowProcess(), 999.0) < 1
    assert student_sigma_cap(linear) == AUTO_CAP_SIGMA == 2.0
    for process in (sd, VPProcess(prediction_type="v_prediction"), VPProcess(prediction_type="sample"),
                    EDMProcess(), FlowProcess()):
        assert student_sigma_cap(process) is None
    assert student_sigma_cap(linear, "none") is None and student_sigma_cap(linear, 5.0) == 5.0
    with pytest.raises(ValueError, match="VP teachers only"):
        student_sigma_cap(EDMProcess(), 5.0)
    with pytest.raises(ValueError, match="inside the teacher's levels"):
        student_sigma_cap(linear, 500.0)


def _teacher_and_student(cap="auto"):
    import copy

    from fewstep.backbones import Backbone, student_sigma_cap

    torch.manual_seed(0)
    process = VPProcess()
    teacher = Backbone(tiny_unet(8, 1)).eval()
    student = copy.deepcopy(teacher)
    student.cap_input_level(process, student_sigma_cap(process, cap))
    return process, teacher, student


def test_capped_student_bounds_the_x0_error() -> None:
    """A network error delta moves the teacher's x0 at sigma_max by 157 delta, the capped student's by at most
    sigma_cap delta (< 2), at every level."""
    process, teacher, student = _teacher_and_student()
    cap = student.input_cap
    assert cap.timestep == 395 and 1.99 < cap.sigma <= 2.0
    sigma = torch.tensor([0.5, 1.5, 14.0, 40.0, process.sigma_max], dtype=torch.float64).float()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigma.view(-1, 1, 1, 1)
    delta = 1e-3
    with torch.no_grad():
        gains = {}
        for name, net in (("teacher", teacher), ("student", student)):
            base = process.denoise(net, x, sigma)
            handle = _perturbed(net, delta)
            moved = process.denoise(net, x, sigma)
            handle.remove()
            gains[name] = (moved - base).abs().flatten(1).mean(1) / delta
    torch.testing.assert_close(gains["teacher"], sigma, rtol=2e-2, atol=0)  # gain = sigma for epsilon
    expected = sigma.clamp(max=cap.sigma)
    torch.testing.assert_close(gains["student"], expected, rtol=2e-2, atol=0)
    assert float(gains["student"].max()) <= 2.0 * 1.02 and float(gains["teacher"].max()) > 150


def test_capped_student_equals_its_teacher_up_to_the_cap() -> None:
    """At init: bit-identical below the cap; above it, the teacher's denoiser at the cap on the same network input
    x_t, D(x alpha(sigma)/alpha(sigma_c), sigma_c)."""
    process, teacher, student = _teacher_and_student()
    cap = student.input_cap
    sigma = torch.tensor([0.1, 1.0, cap.sigma, 60.0, process.sigma_max])
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        d_teacher, d_student = process.denoise(teacher, x, sigma), process.denoise(student, x, sigma)
        assert torch.equal(d_student[:3], d_teacher[:3])
        alpha = (1 + sigma[3:] ** 2).rsqrt() / (1 + torch.tensor(cap.sigma) ** 2).rsqrt()
        at_cap = process.denoise(teacher, x[3:] * alpha.view(-1, 1, 1, 1), torch.full((2,), cap.sigma))
    torch.testing.assert_close(d_student[3:], at_cap, rtol=0, atol=2e-4)


def test_capped_student_round_trips_and_trains(tmp_path) -> None:
    """The cap survives deepcopy, config_dict and save_pretrained / from_pretrained; gradients reach the network
    through the conversion."""
    import copy

    from fewstep.backbones import Backbone

    process, _, student = _teacher_and_student(5.0)
    x, sigma = torch.randn(2, 1, 8, 8) * 100, torch.tensor([100.0, 1.0])
    with torch.no_grad():
        ref = process.denoise(student, x, sigma)
    student.save_pretrained(tmp_path / "student")
    rebuilt = Backbone.from_config_dict(student.config_dict())
    rebuilt.load_state_dict(student.state_dict())
    for other in (copy.deepcopy(student), Backbone.from_pretrained(tmp_path / "student"), rebuilt):
        assert other.input_cap.sigma == student.input_cap.sigma
        with torch.no_grad():
            torch.testing.assert_close(process.denoise(other, x, sigma), ref)
    student.train().requires_grad_(True)
    process.denoise(student, x, sigma).square().mean().backward()
    assert student.model.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("setting", "timestep", "stock_calls"), [
    ("auto", 395, {"1": [395]}),  # the default: sigma 2; DMD2's 2-step levels 999 and 499 both lie above it
    (15.0, 730, {"1": [730], "2": [730, 499]}),
])
def test_the_run_caps_students_of_a_linear_epsilon_teacher(ddpm, tmp_path, setting, timestep, stock_calls) -> None:
    """By default (`teacher.student_sigma_cap: auto`) the run caps a DDPM-epsilon linear-beta teacher's student (and
    the targets copied from it) at sigma 2 (t = 395); the export keeps the cap: its stock LCMScheduler reads the top
    level at the cap's timestep and draws the images fewstep's sampler draws. A step count with two levels above
    the cap would merge two timesteps, so no stock call is documented for it: with the default, DMD2's 2 and 4
    steps; capped at 15 (t = 730), DMD2's 2 steps [999, 499] are stock as [730, 499] and only 4 steps (749 above
    the cap too) are not. `none` leaves the student uncapped."""
    from fewstep.export import EXPORT_META
    from fewstep.testing import run_tiny, tiny_run_config

    config = tiny_run_config(ddpm, {"name": "dmd2", "num_steps": 4, "ratio": 1}, steps=1,
                             validation={"steps": [1, 2, 4]}, teacher={"student_sigma_cap": setting})
    trainer, _ = run_tiny(config, tmp_path / "run")
    cap = trainer.nets.student.input_cap
    assert cap is not None and int(cap.timestep) == timestep
    assert trainer.nets.get("fake_score").input_cap.timestep == trainer.nets.get("ema").input_cap.timestep
    out = tmp_path / "run" / "export"
    meta = json.loads((out / EXPORT_META).read_text())
    calls = meta["stock"]["calls"]
    assert {k: c["timesteps"] for k, c in calls.items()} == stock_calls
    for n in map(int, stock_calls):  # the stock pipeline draws its unit noise L, then its re-noising noise, from one generator
        stock, ours = _stock_and_fewstep(trainer, out, n)
        torch.testing.assert_close(stock, ours, rtol=0, atol=1e-4, msg=lambda m, n=n: f"{n} steps: {m}")
    if setting == "auto":
        uncapped = tiny_run_config(ddpm, {"name": "cd"}, steps=1, teacher={"student_sigma_cap": "none"})
        assert run_tiny(uncapped, tmp_path / "run-none")[0].nets.student.input_cap is None


def test_teacher_training_is_never_capped(ddpm) -> None:
    """The diffusion method regresses its network's raw output, so its config opts out of the conditioning."""
    import copy

    from fewstep.backbones import condition_student
    from fewstep.testing import tiny_run_config

    teacher = load_teacher(ddpm)
    for method, expected in (({"name": "diffusion"}, None), ({"name": "cd"}, 1.99047)):
        config = tiny_run_config(ddpm, method, steps=1, teacher={"student_sigma_cap": "auto"})
        student = copy.deepcopy(teacher.net)
        sigma = condition_student(config, teacher, student)
        assert (sigma is None and student.input_cap is None) if expected is None else sigma == pytest.approx(expected)


def test_a_lora_student_stays_uncapped_and_says_why(ddpm, capsys) -> None:
    """LoRA adapters share the teacher's input levels: "auto" leaves the student uncapped with a note on stderr
    (none for a well-conditioned teacher, none when not announced); an explicit level is refused."""
    import copy

    from fewstep.backbones import condition_student
    from fewstep.testing import tiny_run_config

    teacher = load_teacher(ddpm)
    config = tiny_run_config(ddpm, {"name": "cd"}, steps=1, lora={"rank": 4})
    student = copy.deepcopy(teacher.net)
    assert condition_student(config, teacher, student) is None and student.input_cap is None
    note = capsys.readouterr().err
    assert "LoRA student" in note and "157x" in note and "sigma 2" in note
    assert condition_student(config, teacher, copy.deepcopy(teacher.net), announce=False) is None
    assert capsys.readouterr().err == ""
    explicit = tiny_run_config(ddpm, {"name": "cd"}, steps=1, lora={"rank": 4}, teacher={"student_sigma_cap": 5.0})
    with pytest.raises(ValueError, match="LoRA student cannot take a capped input level"):
        condition_student(explicit, teacher, copy.deepcopy(teacher.net))


# ------------------------------------------------------------------------------------------------
# Students' samplers bound x0 as the teacher's scheduler does (docs/CONDITIONING.md §3)


def _stock_and_fewstep(trainer, out, num_steps):
    """Images in [0, 1] (3, C, H, W) of the export's stock pipeline and of fewstep's sampler from the same noise:
    the pipeline draws its unit noise L and then its re-noising noise from one generator; fewstep starts from
    L / latents_scale and re-noises from the same generator, continued."""
    from diffusers import DiffusionPipeline

    from fewstep.export import EXPORT_META
    from fewstep.sampling import generate

    meta = json.loads((out / EXPORT_META).read_text())["stock"]
    pipe = DiffusionPipeline.from_pretrained(out)
    images = pipe(**meta["calls"][str(num_steps)], batch_size=3, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, *trainer.nets.teacher.sample_shape, generator=g)
    ours = generate(trainer.pm.hook, trainer.ctx, trainer.nets, latents / meta["latents_scale"][str(num_steps)],
                    None, num_steps, generator=g)
    return torch.as_tensor(images).float(), (ours.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("bound", [{}, {"clip_sample": False, "thresholding": True,
                                        "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}])
def test_student_sampler_equals_the_stock_scheduler_with_clipping(bound, tmp_path) -> None:
    """DMD2 (1, 2 and 4 steps) on a stock clip_sample (or dynamically thresholded) DDPM-epsilon teacher: the export's
    stock ConsistencyModelPipeline + LCMScheduler, which bounds x0 in every step, draws fewstep's own samples, and
    fewstep's editing map is the same bounded x0. Control: with the teacher's bound switched off fewstep's samples
    differ from the stock pipeline's by far more than the tolerance, so the bound is active here."""
    from diffusers import LCMScheduler

    from fewstep.testing import run_tiny, tiny_run_config

    teacher = stock_ddpm_folder(tmp_path / "teacher", **bound)
    # The bound is independent of the student's conditioning; uncapped, all of DMD2's 4 timesteps stay stock (the
    # default cap reads 999, 749 and 499 at 395, so 2 and 4 steps would be no stock call: the test above).
    config = tiny_run_config(teacher, {"name": "dmd2", "num_steps": 4, "ratio": 1}, steps=1,
                             validation={"steps": [1, 2, 4]}, teacher={"student_sigma_cap": "none"})
    trainer, _ = run_tiny(config, tmp_path / "run")
    out = tmp_path / "run" / "export"
    process = trainer.nets.teacher.process
    assert process.x0_clip.active and process.for_sampler() is not process
    scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.clip_sample == (not bound) and scheduler.config.thresholding == bool(bound)
    for n in (1, 2, 4):
        stock, ours = _stock_and_fewstep(trainer, out, n)
        # Measured 1e-6 to 5e-6 at 2 and 4 steps; 2.5e-5 at 1 step, in the few unclipped pixels, with or without the
        # bound: x0 = (x_t - s eps) / a at timestep 999 amplifies float32 rounding 157x (tests/test_export_stock.py).
        atol = 5e-5 if n == 1 else 1e-5
        torch.testing.assert_close(ours, stock, rtol=0, atol=atol, msg=lambda m, n=n: f"{n} steps: {m}")
        clip = process.x0_clip
        process.x0_clip = X0Clip()  # the sampler as it was before: x0 unbounded
        try:
            _, free = _stock_and_fewstep(trainer, out, n)
        finally:
            process.x0_clip = clip
        if n > 1 or bound:  # one clipped step equals the unclipped one after the image's own clamp to [-1, 1]
            assert (free - stock).abs().max() > 0.05, n

    den = trainer.pm.hook.fewstep_denoiser(ctx=trainer.ctx, nets=trainer.nets, cond=None)
    x = torch.randn(2, *trainer.nets.teacher.sample_shape, generator=torch.Generator().manual_seed(3)) * 100.0
    sigma = torch.full((2,), 100.0)
    with torch.no_grad():
        raw = process.denoise(trainer.nets.get("ema") or trainer.nets.student, x, sigma)
        torch.testing.assert_close(den.f(x, sigma), process.x0_clip(raw))
    assert raw.abs().max() > 1.5


def test_export_scheduler_keys_follow_the_sampler_bound() -> None:
    """The stock scheduler's keys are the teacher's bound as fewstep's samplers apply it: from process.x0_clip (a
    DDPM config without the key clips, as diffusers' class default), and clip_r then the sampler's own clamp to
    [-1, 1] as one range min(r, 1); thresholding kept; nothing for a scheduler without the keys or a teacher
    without a bound."""
    from types import SimpleNamespace

    from fewstep.export import _teacher_scheduler_options as options

    def teacher(clip):
        return SimpleNamespace(process=VPProcess(x0_clip=clip))

    wide = X0Clip(clip_sample=True, clip_sample_range=2.0)
    assert options(teacher(X0Clip()), "LCMScheduler", {"clip_sample": True}) == {}
    assert options(teacher(wide), "LCMScheduler", {"clip_sample": True})["clip_sample_range"] == 1.0
    assert options(teacher(wide), "LCMScheduler", {"clip_sample": False})["clip_sample_range"] == 2.0
    thresholded = options(teacher(X0Clip(thresholding=True, sample_max_value=1.5)), "LCMScheduler", {})
    assert thresholded["thresholding"] and thresholded["sample_max_value"] == 1.5
    assert options(teacher(wide), "CMStochasticIterativeScheduler", {"clip_denoised": True}) == {}
    default = SimpleNamespace(process=process_from_scheduler_config({"_class_name": "DDPMScheduler"}))
    assert options(default, "LCMScheduler", {})["clip_sample"] is True


def test_for_sampler_leaves_unbounded_teachers_alone() -> None:
    """A process whose scheduler bounds nothing is its own sampler view (samplers bit-unchanged); a bounding one
    gets a view whose denoise clips, while the process itself (training, targets) does not."""
    from fewstep.diffusion import EDMProcess, FlowProcess

    for process in (VPProcess(), EDMProcess(), FlowProcess()):
        assert process.for_sampler() is process
    process = VPProcess(x0_clip=X0Clip(clip_sample=True, clip_sample_range=0.5))
    view = process.for_sampler()
    assert view.bounds_x0 and not process.bounds_x0 and view.for_sampler() is view
    net = lambda x_t, t, cond: torch.zeros_like(x_t)  # noqa: E731 - epsilon 0: x0 = x
    x = torch.linspace(-2, 2, 16).reshape(1, 1, 4, 4)
    torch.testing.assert_close(process.denoise(net, x, 1.0), x)
    torch.testing.assert_close(view.denoise(net, x, 1.0), x.clamp(-0.5, 0.5))


def test_backward_simulation_bounds_the_intermediate_x0_only() -> None:
    """DMD2's backward simulation re-noises the bounded x0, as the sampler does; the generator's output, which the
    losses read, stays unbounded."""
    from fewstep.distribution import simulate
    from fewstep.types import StepInfo

    levels = torch.tensor([10.0, 1.0, 0.5])
    bound = X0Clip(clip_sample=True)
    calls = []

    def generator(x, sigma):
        calls.append(x.clone())
        return 3.0 * torch.ones_like(x)  # x0 far outside [-1, 1]

    def step():
        return StepInfo(step=0, nimg=0, total_nimg=100, phase="train", phase_progress=0.0, progress=0.0,
                        generator=torch.Generator().manual_seed(0), local_batch=2, global_batch=2)

    noise = torch.zeros(2, 1, 2, 2)
    x_free, _ = simulate(generator, noise, levels, 2, step())
    x_bounded, sigma = simulate(generator, noise, levels, 2, step(), bound)
    # zero noise in, the same fresh noise out: the inputs differ by exactly the clipped part of x0, 3 - 1
    torch.testing.assert_close(x_free - x_bounded, torch.full_like(x_free, 2.0))
    assert float(sigma[0]) == 0.5


#: Every method whose sampler runs on an unconditional pixel VP teacher, as the tiny recipes of its own tests set it
#: up (guided and MSD need a conditional teacher, LowDiff cascade stages: they sample through the same bounded
#: denoisers);
#: "x0": the sampler's last evaluation is its output's x0 (then bounded), else a consistency function or a jump to
#: sigma_min.
SAMPLER_METHODS = [
    ({"name": "cd", "num_scales": 8}, False), ({"name": "cd", "num_scales": 8, "boundary": "lcm"}, True),
    ({"name": "ct", "s0": 2, "s1": 10}, False), ({"name": "ect", "stage_nimg": 8}, False),
    ({"name": "tcm", "stage_nimg": 8}, False), ({"name": "ctm", "num_scales": 6, "num_heun_steps_max": 2}, False),
    ({"name": "scm", "mode": "scd", "warmup_nimg": 8}, True), ({"name": "dmd2", "ratio": 1}, True),
    ({"name": "fdistill", "ratio": 2}, True),
    ({"name": "ladd"}, True), ({"name": "kd"}, True), ({"name": "reflow"}, False),
    ({"name": "pcm", "solver_steps": 8}, True), ({"name": "flowmap", "warmup_nimg": 8}, True),
    ({"name": "meanflow"}, True),
    ({"name": "diffusion", "solver": "euler"}, True),
]


def _bounded_samples(trainer, noise, cond):
    """(n, samples) of the run's 1- and 2-step samplers, each checked to change when the teacher's x0 bound is
    switched off (so the sampler reads it)."""
    from fewstep.sampling import generate

    process = trainer.nets.teacher.process
    out = []
    for n in (1, 2):
        ours = generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, cond, n, seed=1)
        clip, process.x0_clip = process.x0_clip, X0Clip()
        try:
            free = generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, cond, n, seed=1)
        finally:
            process.x0_clip = clip
        assert (ours - free).abs().max() > 1e-3, f"{n} steps: the sampler ignores the teacher's x0 bound"
        out.append((n, ours))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method, x0_last", SAMPLER_METHODS, ids=lambda m: m["name"] if isinstance(m, dict) else "")
def test_every_student_sampler_reads_the_bounded_x0(method, x0_last, tmp_path_factory, tmp_path) -> None:
    """On a teacher that clips x0 to ±0.5 (tighter than the samplers' own [-1, 1] clamps), every method's 1- and
    2-step samples change when the bound is switched off (each sampler reads it), and a sampler whose last
    evaluation is an x0 returns samples inside ±0.5. ~10 s per method."""
    from fewstep.testing import run_tiny, tiny_pairs, tiny_run_config

    teacher = tmp_path_factory.getbasetemp() / "clip-half" / "teacher"
    if not teacher.exists():
        stock_ddpm_folder(teacher, clip_sample_range=0.5)
    data = {"pairs": str(tiny_pairs(teacher))} if method["name"] in ("kd", "reflow", "ladd") else {}
    trainer, _ = run_tiny(tiny_run_config(teacher, method, steps=2, data=data), tmp_path / "run")
    noise = torch.randn(4, *trainer.nets.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    for n, ours in _bounded_samples(trainer, noise, None):
        if x0_last:  # an Euler step into 0 from sigma 157 returns x0 up to float32 rounding of x (~1e-5)
            assert ours.abs().max() <= 0.5 + 1e-4, f"{n} steps"


@pytest.mark.slow
@pytest.mark.parametrize("method, options", [
    ({"name": "guided", "stage1_nimg": 4, "round_nimg": 8, "start_steps": 8, "final_steps": 2}, {}),
    ({"name": "msd", "num_students": 3, "ratio": 2, "adm_nimg": 4}, {"plugins": {"disable": ["ema"]}}),
], ids=["guided", "msd"])
def test_conditional_student_samplers_read_the_bounded_x0(method, options, tmp_path) -> None:
    """As above for the methods that need a class-conditional teacher (guided's DDIM with its kept round models,
    MSD's routed DMD2 sampler): samples inside ±0.5, and different without the bound."""
    from fewstep.export import condition
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "teacher", "unet", conditioning="class",
                                process_options={"x0_clip": X0Clip(clip_sample=True, clip_sample_range=0.5)})
    steps = 5 if method["name"] == "guided" else 2  # guided: stage 1 and both halving rounds
    trainer, _ = run_tiny(tiny_run_config(teacher, method, steps=steps, **options), tmp_path / "run")
    assert trainer.nets.teacher.process.x0_clip.clip_sample
    noise = torch.randn(4, *trainer.nets.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = condition(trainer.nets.teacher, 4, [0, 1, 2, 3])
    for n, ours in _bounded_samples(trainer, noise, cond):
        assert ours.abs().max() <= 0.5 + 1e-4, f"{n} steps"
