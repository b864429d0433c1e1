"""Stock-pipeline exports (fewstep.export, hook fewstep_stock_sampler): the teacher family's own diffusers pipeline
with the student as a plain diffusers model and a stock scheduler, loaded with `DiffusionPipeline.from_pretrained`
(no trust_remote_code, no fewstep class named anywhere) and drawing the images `fewstep sample` draws for the same
noise; the Hub-format model card, its snippet, its sample grid; fp16 variants; the teacher's x0 clipping.

Tolerance: images in [0, 1] agree to 1e-4 (max abs). The two sides compute the same maths in a different order
(diffusers' float32 alphas_cumprod against fewstep's float64 table, x_t-space against sigma-space updates, an
integer timestep against fewstep's float32 t = 999 ± 5e-5); measured: 2e-7 to 4e-7 on latent teachers, 3e-5 on
pixel ones (x0 = (x_t - sigma eps) / alpha amplifies rounding by 1 / alpha = 15 at timestep 999).
"""

import dataclasses
import json
import re

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

from fewstep.export import EXPORT_META, SAMPLES_FILE, card_snippet, condition, load_export
from fewstep.sampling import generate
from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

ATOL = 1e-4
PROMPTS = ["a cat", "two dogs", "tree"]
LABELS = [1, 4, 9]


def _only_stock_classes(folder) -> None:
    """model_index.json names a diffusers pipeline and diffusers/transformers components only."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    assert isinstance(index["_class_name"], str) and hasattr(diffusers, index["_class_name"])
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        library = {"diffusers": diffusers, "transformers": transformers}[value[0]]
        assert hasattr(library, value[1]), (key, value)
    assert not list(folder.glob("*.py")), "a stock export has no pipeline file"


def _train(tmp_path, backbone, method, *, steps=2, validation_steps=(1, 2), sigma_cap=None, **teacher_options):
    """sigma_cap: the run's teacher.student_sigma_cap (None: the default, auto)."""
    teacher = make_tiny_teacher(tmp_path / "teacher", backbone, **teacher_options)
    sections = {} if sigma_cap is None else {"teacher": {"student_sigma_cap": sigma_cap}}
    config = tiny_run_config(teacher, method, steps=steps, validation={"steps": list(validation_steps)}, **sections)
    trainer, _ = run_tiny(config, tmp_path / "run")
    return trainer, tmp_path / "run" / "export"


def _condition_kwargs(teacher, condition_arg):
    if teacher.conditioning == "class":
        return {"class_labels": LABELS}, {"class_labels": LABELS}
    if teacher.conditioning == "text":
        return {"prompt": PROMPTS}, {"prompt": PROMPTS}
    return {"batch_size": 3}, {}


def assert_stock_matches_fewstep(trainer, out, expect_pipeline, expect_scheduler, expect_steps):
    """For every documented step count, the stock pipeline with the card's call arguments draws fewstep's
    images: the pipeline's unit noise L is fewstep's noise L / latents_scale; re-noising uses one generator."""
    meta = json.loads((out / EXPORT_META).read_text())
    stock = meta["stock"]
    assert meta["pipeline"] == expect_pipeline and stock["scheduler"] == expect_scheduler
    assert sorted(int(n) for n in stock["calls"]) == list(expect_steps)
    _only_stock_classes(out)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == expect_pipeline and type(pipe.scheduler).__name__ == expect_scheduler
    teacher = trainer.nets.teacher
    call_cond, fewstep_cond = _condition_kwargs(teacher, stock["condition"])
    cond = condition(teacher, 3, fewstep_cond.get("class_labels"), fewstep_cond.get("prompt"))
    for n, kwargs in stock["calls"].items():
        g = torch.Generator().manual_seed(0)
        latents = torch.randn((3, *teacher.sample_shape), generator=g)
        renoise = torch.Generator().manual_seed(1)
        if stock["takes_latents"]:
            call = {**kwargs, **call_cond, "latents": latents, "generator": torch.Generator().manual_seed(1)}
        else:  # the pipeline draws L from its generator itself, then re-noises from it (or the global one)
            call = {**kwargs, **call_cond, "generator": torch.Generator().manual_seed(0)}
            renoise = g if stock["renoise_generator"] else renoise
        if stock["batch_size"]:
            call["batch_size"] = 3
        if not stock["renoise_generator"]:
            torch.manual_seed(1)  # it re-noises from torch's global generator
        images = pipe(**call, output_type="pt" if expect_pipeline != "DiTPipeline" else "np").images
        images = torch.as_tensor(images)
        if images.shape[-1] != teacher.data_shape[-1] or images.shape[1] != teacher.data_shape[0]:
            images = images.permute(0, 3, 1, 2)
        scale = stock["latents_scale"][n]
        ours = generate(trainer.pm.hook, trainer.ctx, trainer.nets, latents / scale, cond, int(n), generator=renoise)
        ours = (ours.clamp(-1, 1) + 1) / 2
        assert images.shape == ours.shape
        torch.testing.assert_close(images.float(), ours, rtol=0, atol=ATOL, msg=lambda m, n=n: f"{n} steps: {m}")


#: Stable Diffusion 1.x/2.x's betas (top-level x0 gain 14.6): a teacher the default student conditioning
#: (teacher.student_sigma_cap: auto) leaves uncapped, as real Stable Diffusion checkpoints are.
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def test_dmd2_on_a_text_teacher_exports_stable_diffusion_with_lcm_timesteps(tmp_path):
    """The tiny text teacher has Stable Diffusion's betas, as the checkpoints StableDiffusionPipeline loads: its
    student is not capped, so all of DMD2's 4 timesteps are stock (a DDPM-linear teacher's capped student keeps
    1 and 2 steps only: test_capped_multistep_student_exports_stock_where_its_levels_stay_distinct)."""
    trainer, out = _train(tmp_path, "unet_condition", {"name": "dmd2", "num_steps": 4, "ratio": 1},
                          validation_steps=(1, 2, 4), latent=True, process_options=SD_BETAS)
    assert_stock_matches_fewstep(trainer, out, "StableDiffusionPipeline", "LCMScheduler", [1, 2, 4])
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["stock"]["calls"]["4"] == {"timesteps": [999, 749, 499, 249], "guidance_scale": 1.0, "height": 8,
                                           "width": 8}


#: The DiT tests check how DiTPipeline, which takes no custom timesteps, is given a sampler's schedule; they set
#: teacher.student_sigma_cap: none because the tiny DiT teacher has DDPM's linear betas, as real DiT checkpoints do,
#: whose capped students (the default) are FewStepPipelines: test_capped_dit_student_is_a_few_step_pipeline.
def test_dmd2_on_a_dit_teacher_exports_dit_pipeline(tmp_path):
    """DiTPipeline takes no custom timesteps: LCMScheduler's own N-step schedule must be DMD2's (999, 499)."""
    trainer, out = _train(tmp_path, "dit", {"name": "dmd2", "num_steps": 2, "ratio": 1}, latent=True,
                          sigma_cap="none")
    assert_stock_matches_fewstep(trainer, out, "DiTPipeline", "LCMScheduler", [1, 2])
    calls = json.loads((out / EXPORT_META).read_text())["stock"]["calls"]
    assert calls["2"] == {"num_inference_steps": 2, "guidance_scale": 1.0}


def test_lcm_original_steps_chosen_for_a_pipeline_without_custom_timesteps(tmp_path):
    """DMD2 with 4 generator steps on DiT: 999, 749, 499, 249 is not a subset of LCMScheduler's default 50-level
    schedule (k = 20), so the export sets original_inference_steps = 4."""
    trainer, out = _train(tmp_path, "dit", {"name": "dmd2", "num_steps": 4, "ratio": 1}, latent=True,
                          validation_steps=(1, 2, 4), sigma_cap="none")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["original_inference_steps"] == 4
    assert_stock_matches_fewstep(trainer, out, "DiTPipeline", "LCMScheduler", [1, 2, 4])


def test_capped_dit_student_is_a_few_step_pipeline(tmp_path):
    """With the default conditioning a DiT teacher with DDPM's linear betas gets a capped student (it reads timestep
    999 at 395): DiTPipeline cannot pass timestep 395 to LCMScheduler, whose own 1-step schedule is 999, so the export
    is a FewStepPipeline whose reason names the cap and how to lift it, and it draws the student's images."""
    trainer, out = _train(tmp_path, "dit", {"name": "dmd2", "num_steps": 2, "ratio": 1}, latent=True, steps=1,
                          validation_steps=(1,))
    assert int(trainer.nets.student.input_cap.timestep) == 395
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["pipeline"] == "FewStepPipeline" and meta["stock"] is None
    reason = meta["custom_reason"]
    assert "DiTPipeline cannot pass the custom schedule of the 1-step sampler" in reason
    assert "capped input level" in reason and "teacher.student_sigma_cap: none" in reason
    assert reason in (out / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    images = pipe(class_labels=LABELS[:2], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert type(pipe).__name__ == "FewStepPipeline" and images.shape == (2, *trainer.nets.teacher.data_shape)


@pytest.mark.parametrize("conditioning", [None, "class"])
def test_scm_on_a_pixel_teacher_exports_consistency_pipeline_with_clipping(tmp_path, conditioning):
    """sCM's sampler clamps x0 on pixel teachers: LCMScheduler with clip_sample; its 2-step time 1.1 is off the
    integer timesteps, so only 1 step is documented. The teacher has Stable Diffusion's betas: its top level
    (14.6) is below sCM's sigma_max 80, so the sampler starts at timestep 999. (DDPM's linear betas put it at 157,
    where x0 = (x_t - sigma eps) / alpha amplifies the float32 rounding of the timestep by 1 / alpha = 157:
    a few pixels then differ by up to 4e-3.)"""
    trainer, out = _train(tmp_path, "unet", {"name": "scm"}, conditioning=conditioning, process_options=SD_BETAS)
    assert_stock_matches_fewstep(trainer, out, "ConsistencyModelPipeline", "LCMScheduler", [1])
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is True


def test_one_step_ect_on_an_openai_edm_teacher_exports_the_consistency_pipeline(tmp_path):
    trainer, out = _train(tmp_path, "unet", {"name": "ect"}, process="edm",
                          process_options={"timestep_scale": 1000.0})
    assert_stock_matches_fewstep(trainer, out, "ConsistencyModelPipeline", "CMStochasticIterativeScheduler", [1])


def test_lcm_style_cd_student_takes_the_guidance_scale_as_the_pipeline_does(tmp_path):
    """An LCM-style student on an SD UNet reads w through time_cond_proj_dim (LCM's UNets): the export folds
    nothing, its card calls StableDiffusionPipeline with guidance_scale=w (which then turns CFG off), and the stock
    pipeline at two other guidance scales draws fewstep's images at those w; fewstep reads the export back."""
    method = {"name": "cd", "grid": "teacher", "boundary": "lcm", "solver": "ddim", "guidance": [2.0, 6.0],
              "sample_guidance": 3.0}
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet_condition", latent=True)
    config = tiny_run_config(teacher, method, steps=2, validation={"steps": [1, 2]}, plugins={"disable": ["ema"]},
                             optimizer={"lr": 1e-2})
    trainer, _ = run_tiny(config, tmp_path / "run")
    out = tmp_path / "run" / "export"
    assert_stock_matches_fewstep(trainer, out, "StableDiffusionPipeline", "LCMScheduler", [1])
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["stock"]["folded_scalars"] == {} and meta["stock"]["calls"]["1"]["guidance_scale"] == 3.0
    assert json.loads((out / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 256
    pipe = DiffusionPipeline.from_pretrained(out)
    cond = condition(trainer.nets.teacher, 3, prompt=PROMPTS)
    latents = torch.randn((3, *trainer.nets.teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    call = {**meta["stock"]["calls"]["1"], "prompt": PROMPTS, "latents": latents, "output_type": "pt"}
    scale = meta["stock"]["latents_scale"]["1"]
    drawn = []
    for w in (1.5, 7.0):
        stock = pipe(**{**call, "guidance_scale": w}).images
        ctx = dataclasses.replace(trainer.ctx, method=trainer.ctx.method.model_copy(update={"sample_guidance": w}))
        ours = (generate(trainer.pm.hook, ctx, trainer.nets, latents / scale, cond, 1).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(stock.float(), ours, rtol=0, atol=ATOL, msg=lambda m, w=w: f"w = {w}: {m}")
        drawn.append(stock)
    assert (drawn[0] - drawn[1]).abs().max() > 10 * ATOL  # the trained w input changes the images
    loaded = load_export(out).nets.student
    assert loaded.extra_scalars == ("w",) and loaded.native_guidance
    for k, v in trainer.nets.student.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)


def test_model_card_is_in_hub_format_and_its_snippet_runs(tmp_path, monkeypatch):
    """On a teacher with Stable Diffusion's betas (uncapped student: DMD2's own timesteps in the snippet)."""
    trainer, out = _train(tmp_path, "unet_condition", {"name": "dmd2", "num_steps": 2, "ratio": 1}, latent=True,
                          process_options=SD_BETAS)
    readme = (out / "README.md").read_text()
    header = yaml.safe_load(readme.split("---\n")[1])
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "text-to-image"
    assert header["base_model"] == "teacher" and "dmd2" in header["tags"]
    assert (out / SAMPLES_FILE).is_file() and f"]({SAMPLES_FILE})" in readme
    assert "LCMScheduler" in readme and "timesteps=[999, 499]" in readme
    assert str(tmp_path) not in readme.split("## Recipe")[0]  # no local path before the recipe
    snippet = card_snippet(readme)
    assert "trust_remote_code" not in snippet and "fewstep" not in snippet
    monkeypatch.chdir(out.parent)
    exec(compile(snippet, "model card", "exec"), {})
    assert (out.parent / "sample.png").is_file()


def test_custom_pipeline_only_where_no_stock_scheduler_fits_and_the_card_says_why(tmp_path, capsys, monkeypatch):
    """CD with CM boundary scalings on a VP teacher: f(x, sigma_max) is not the plain denoiser (r = 1 - 6e-5), so
    no stock scheduler reproduces it: FewStepPipeline, with the reason printed and in the card."""
    trainer, out = _train(tmp_path, "unet", {"name": "cd", "num_scales": 4})
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["pipeline"] == "FewStepPipeline" and meta["stock"] is None
    assert "no stock diffusers scheduler" in meta["custom_reason"]
    assert "because" in capsys.readouterr().out
    readme = (out / "README.md").read_text()
    assert meta["custom_reason"] in readme and "trust_remote_code=True" in card_snippet(readme)
    monkeypatch.chdir(out.parent)
    exec(compile(card_snippet(readme), "model card", "exec"), {})


def test_fp16_variant_where_the_teacher_has_one_and_clip_sample_is_kept(tmp_path):
    """A teacher folder with fp16 variant files gets an fp16 variant of the student; a teacher scheduler with
    clip_sample keeps it in the export's stock scheduler config."""
    from diffusers import UNet2DConditionModel

    teacher = make_tiny_teacher(tmp_path / "teacher", "unet_condition", latent=True)
    UNet2DConditionModel.from_pretrained(teacher / "unet").half().save_pretrained(teacher / "unet", variant="fp16")
    sched = teacher / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": True, "clip_sample_range": 1.0}))
    config = tiny_run_config(teacher, {"name": "dmd2", "ratio": 1}, steps=1)
    run_tiny(config, tmp_path / "run")
    out = tmp_path / "run" / "export"
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is True and scheduler["clip_sample_range"] == 1.0
    pipe = DiffusionPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert re.search(r'variant="fp16"', (out / "README.md").read_text())


def test_guided_on_an_edm_teacher_exports_edm_euler(tmp_path):
    """Guided distillation's DDIM sampler is Euler in sigma space: EDMEulerScheduler on an EDM teacher (pixel
    clipping off), with w = sample_w folded in, at 1 step and at start_steps (its own Karras grids)."""
    method = {"name": "guided", "stage1_nimg": 4, "round_nimg": 4, "start_steps": 8, "final_steps": 1,
              "keep_steps": [], "clip": False, "sample_w": 2.0}
    trainer, out = _train(tmp_path, "unet", method, steps=4, validation_steps=(1, 2, 8), process="edm",
                          conditioning="class")
    assert_stock_matches_fewstep(trainer, out, "ConsistencyModelPipeline", "EDMEulerScheduler", [1, 8])


# ------------------------------------------------------------------------------------------------
# Every teacher family (tiny stock pipelines of fewstep.testing) x the methods with a stock mapping.
# docs/EXPORT.md's table is this one.

LCM_STYLE = {"name": "cd", "grid": "teacher", "boundary": "lcm", "solver": "ddim", "guidance": [2.0, 6.0],
             "sample_guidance": 3.0}
FAMILY_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "pixart_sigma": "PixArtSigmaPipeline",
                    "sana": "SanaPipeline"}
VP_FAMILIES, FLOW_FAMILIES = ("sd", "sdxl", "pixart_sigma"), ("sd3", "flux", "sana")
#: (family, method) -> (method section, expected scheduler and step counts, or None: FewStepPipeline)
FAMILY_MATRIX = {
    **{(f, "dmd2"): ({"name": "dmd2", "num_steps": 2, "ratio": 1}, ("LCMScheduler", [1, 2])) for f in ("sd", "sdxl")},
    # PixArt's linear betas (x0 gain 157 at t = 999): the default cap (sigma 2, t = 395) reads both 2-step levels
    # (999, 499) at 395, so only the 1-step sampler has a stock call
    ("pixart_sigma", "dmd2"): ({"name": "dmd2", "num_steps": 2, "ratio": 1}, ("LCMScheduler", [1])),
    **{(f, "dmd2"): ({"name": "dmd2", "num_steps": 2, "ratio": 1}, ("FlowMatchLCMScheduler", [1, 2]))
       for f in FLOW_FAMILIES},
    # sCM's 2-step time 1.1 falls between VP timesteps; PixArt's linear betas reach sigma 157 > sCM's 80, so
    # its first level is between timesteps too.
    **{(f, "scm"): ({"name": "scm"}, ("LCMScheduler", [1])) for f in ("sd", "sdxl")},
    ("pixart_sigma", "scm"): ({"name": "scm"}, None),
    **{(f, "scm"): ({"name": "scm"}, ("FlowMatchLCMScheduler", [1, 2])) for f in FLOW_FAMILIES},
    **{(f, "cd"): (LCM_STYLE, ("LCMScheduler", [1])) for f in VP_FAMILIES},
    **{(f, "cd"): ({"name": "cd", "num_scales": 4}, ("FlowMatchLCMScheduler", [1])) for f in FLOW_FAMILIES},
    # ECT starts at sigma 80 (not the flow teacher's 999), where CM's boundary scalings leave f 1.3e-5 from the
    # denoiser (sigma_min / 80): above BOUNDARY_TOLERANCE, so no stock scheduler reproduces it.
    ("sd3", "ect"): ({"name": "ect"}, None),
    # CTM's gamma sampler feeds the target time s, different at every step
    **{(f, "ctm"): ({"name": "ctm"}, None) for f in ("sd", "sd3")},
}
#: Cells in the default test run (the rest are slow): one per family, each a different path (LCM-style w folded
#: into SD; LCM timesteps through SDXL and PixArt; FlowMatchLCM sigmas through SD3, packed Flux and Sana).
DEFAULT_CELLS = {("sd", "cd"), ("sdxl", "dmd2"), ("sd3", "scm"), ("flux", "dmd2"), ("pixart_sigma", "dmd2"),
                 ("sana", "dmd2")}


def _unpacked_renoise(monkeypatch, sample_shape):
    """Make FlowMatchLCMScheduler draw its re-noising noise as fewstep does, (B, C, H, W), packed afterwards,
    so that multistep FluxPipeline images can be compared with fewstep's for one seed."""
    from diffusers.schedulers import scheduling_flow_match_lcm

    from fewstep.backbones import pack_latents

    def randn(shape, generator=None, device=None, dtype=None, **_):
        return pack_latents(torch.randn((shape[0], *sample_shape), generator=generator, dtype=dtype)).to(device)

    monkeypatch.setattr(scheduling_flow_match_lcm, "randn_tensor", randn)


@pytest.mark.parametrize(("family", "method"), [
    pytest.param(f, m, id=f"{f}-{m}", marks=() if (f, m) in DEFAULT_CELLS else pytest.mark.slow)
    for f, m in FAMILY_MATRIX])
def test_family_export_matrix(family, method, tmp_path_factory, tmp_path, monkeypatch):
    from fewstep.testing import tiny_family_teacher

    section, expected = FAMILY_MATRIX[family, method]
    folder, prompts = tiny_family_teacher(family, tmp_path_factory.getbasetemp() / "tiny-families")
    config = tiny_run_config(folder, section, steps=1, batch=2, data={"prompts": str(prompts)},
                             validation={"steps": [1, 2]})
    trainer, _ = run_tiny(config, tmp_path / "run")
    out = tmp_path / "run" / "export"
    # fewstep reads the export back (`fewstep sample OUT`): the family's encoders, the student, the same images
    loaded = load_export(out)
    teacher = trainer.nets.teacher
    noise = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    ours, theirs = (generate(run.pm.hook if hasattr(run, "pm") else run.hook, run.ctx, run.nets, noise,
                             condition(run.nets.teacher, 2, None, PROMPTS[:2]), 1, seed=3) for run in (trainer, loaded))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    if expected is None:
        meta = json.loads((out / EXPORT_META).read_text())
        assert meta["pipeline"] == "FewStepPipeline" and meta["custom_reason"]
        assert meta["custom_reason"] in (out / "README.md").read_text()
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)  # every family encoder is a component
        images = pipe(prompt=PROMPTS[:2], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
        assert type(pipe).__name__ == "FewStepPipeline" and images.shape == (2, *teacher.data_shape)
        return
    if family == "flux":
        _unpacked_renoise(monkeypatch, trainer.nets.teacher.sample_shape)
    assert_stock_matches_fewstep(trainer, out, FAMILY_PIPELINES[family], *expected)
