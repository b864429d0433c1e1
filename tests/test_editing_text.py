"""Text-guided img2img and inpainting in 2-4 steps (issue 16 item 2) with a stock export: the family's stock
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline load the export's components
(``AutoPipelineFor*.from_pipe``), run the student with the export's stock scheduler at a strength, and give the
pixels of fewstep's own ``--task img2img`` sampler on the run (same generator, same starting latents)."""

from __future__ import annotations

import json

import torch

from fewstep.export import EXPORT_META
from fewstep.testing import run_tiny, tiny_family_teacher, tiny_run_config


def _tiny_dmd2_export(family, tmp_path):
    """A one-step dmd2 run (4 generator levels) on a tiny text family and its stock export's call arguments."""
    folder, prompts = tiny_family_teacher(family, tmp_path / "tiny-families")
    config = tiny_run_config(folder, {"name": "dmd2", "num_steps": 4, "ratio": 1}, steps=1, batch=2,
                             data={"prompts": str(prompts)},
                             validation={"steps": [2, 4], "num_images": 2, "teacher_steps": 2, "upscale": 1})
    trainer, _ = run_tiny(config, tmp_path / "run")
    out = tmp_path / "run" / "export"
    return trainer, out, json.loads((out / EXPORT_META).read_text())["stock"]["calls"]


def test_stock_img2img_and_inpaint_pipelines_match_fewstep_img2img(tmp_path):
    """DMD2 on the tiny SD family, 2 and 4 steps, strength 0.5. diffusers encodes a pixel image by sampling the
    VAE posterior with the generator (its first draw) where fewstep takes the posterior mean, so the pipelines
    get fewstep's latents as ``image`` (a 4-channel image is taken as latents, no draw); from there both draw
    the noise to the first kept timestep and then one re-noising per step from the same generator."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

    from fewstep.editing import edit
    from fewstep.export import condition

    trainer, out, calls = _tiny_dmd2_export("sd", tmp_path)  # 4 latent channels, as SD
    hook, ctx, nets = trainer.pm.hook, trainer.ctx, trainer.nets
    pipe = DiffusionPipeline.from_pretrained(out)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline"
    assert img2img.unet is pipe.unet and type(img2img.scheduler).__name__ == "LCMScheduler"
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    channels = pipe.vae.config.in_channels
    image = torch.rand((1, channels, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = nets.teacher.encode(image)
    known = torch.ones((1, 1, size, size))
    known[..., size // 2:, :] = 0  # fewstep: 1 = known; diffusers' mask_image: 1 (white) = repaint
    cond = condition(nets.teacher, 1, prompt=["a cat"])
    results = {}
    for n in ("2", "4"):
        kwargs = {k: v for k, v in calls[n].items() if k != "num_inference_steps"}
        steps = calls[n].get("num_inference_steps", int(n))
        for p, mask, extra in ((img2img, None, {}),
                               (inpaint, known, {"mask_image": 1 - known, "masked_image_latents": latents})):
            stock = p(prompt=["a cat"], image=latents, strength=0.5, num_inference_steps=steps, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **kwargs, **extra).images
            ours = edit(hook, ctx, nets, "img2img", image, int(n), strength=0.5, mask=mask, cond=cond,
                        generator=torch.Generator().manual_seed(0))
            ours = (ours / 2 + 0.5).clamp(0, 1)  # diffusers' postprocessing of "pt" output
            assert stock.shape == ours.shape == (1, channels, size, size)
            torch.testing.assert_close(stock, ours, atol=1e-4, rtol=0)  # measured: 1.0e-6 to 1.5e-6
            results[n, mask is None] = ours
    # the comparison discriminates: another seed, or inpainting against plain img2img, changes the pixels
    other = edit(hook, ctx, nets, "img2img", image, 4, strength=0.5, cond=cond, generator=torch.Generator().manual_seed(1))
    assert float(((other / 2 + 0.5).clamp(0, 1) - results["4", True]).abs().max()) > 1e-2
    assert float((results["4", True] - results["4", False]).abs().max()) > 1e-2


def test_stock_sd3_img2img_matches_fewstep_img2img_on_the_global_generator(tmp_path):
    """A flow teacher (tiny SD3, FlowMatchLCMScheduler with custom sigmas): StableDiffusion3Img2ImgPipeline does
    not pass ``generator`` to ``scheduler.step``, so its re-noising draws from torch's global generator. Both
    sides then draw everything from the global generator (``generator=None``) after the same seed: the same
    pixels at 2 and 4 steps, strength 0.5 (measured 8.3e-7 and 1.1e-6)."""
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    from fewstep.editing import edit
    from fewstep.export import condition

    trainer, out, calls = _tiny_dmd2_export("sd3", tmp_path)
    hook, ctx, nets = trainer.pm.hook, trainer.ctx, trainer.nets
    img2img = AutoPipelineForImage2Image.from_pipe(DiffusionPipeline.from_pretrained(out))
    assert type(img2img).__name__ == "StableDiffusion3Img2ImgPipeline"
    assert type(img2img.scheduler).__name__ == "FlowMatchLCMScheduler"
    image = torch.rand((1, *nets.teacher.data_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = nets.teacher.encode(image)  # as latents: no posterior draw (see the test above)
    cond = condition(nets.teacher, 1, prompt=["a cat"])
    for n in ("2", "4"):
        kwargs = {k: v for k, v in calls[n].items() if k != "num_inference_steps"}
        torch.manual_seed(0)
        stock = img2img(prompt=["a cat"], image=latents, strength=0.5, num_inference_steps=int(n), output_type="pt",
                        **kwargs).images
        torch.manual_seed(0)
        ours = edit(hook, ctx, nets, "img2img", image, int(n), strength=0.5, cond=cond)
        torch.testing.assert_close(stock, (ours / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)


def test_lcm_scheduler_img2img_is_the_editing_sampler_of_an_lcm_style_cd_student_without_the_floor(tmp_path):
    """LCM-style cd (``boundary: lcm``, ``grid: teacher``): its stock export is stock only at 1 step, and CM's
    multistep sampler re-noises to sqrt(tau^2 - sigma_min^2). The closest exact statement: StableDiffusion-
    Img2ImgPipeline with LCMScheduler at LCM's timestep_scaling 10 (the student's boundary scalings) on custom
    timesteps equals fewstep's editing sampler with f = the student's consistency function at those levels and
    re-noise floor 0 (measured 5e-6 on latents of size 7.5); the floor sigma_min alone changes the latents
    (measured 2.2e-3)."""
    import dataclasses

    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline, LCMScheduler

    from fewstep.editing import Nothing, edit_sample, student_denoiser
    from fewstep.export import condition

    folder, prompts = tiny_family_teacher("sd", tmp_path / "tiny-families")
    method = {"name": "cd", "num_scales": 4, "boundary": "lcm", "grid": "teacher"}
    config = tiny_run_config(folder, method, steps=1, batch=2, data={"prompts": str(prompts)},
                             validation={"steps": [1], "num_images": 2, "teacher_steps": 2, "upscale": 1})
    trainer, _ = run_tiny(config, tmp_path / "run")
    hook, ctx, nets = trainer.pm.hook, trainer.ctx, trainer.nets
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "export")
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=10.0)
    image = torch.rand((1, *nets.teacher.data_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = nets.teacher.encode(image)
    timesteps = [999, 759, 499, 259]  # strength 0.5 keeps 499, 259
    stock = img2img(prompt=["a cat"], image=latents, strength=0.5, timesteps=timesteps, guidance_scale=1.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images
    den = student_denoiser(hook, ctx, nets, condition(nets.teacher, 1, prompt=["a cat"]))
    levels = nets.teacher.process.t_to_sigma(torch.tensor(timesteps[2:], dtype=torch.float64)).tolist()
    runs = {}
    for floor in (0.0, den.renoise_floor):
        with torch.no_grad():
            runs[floor] = edit_sample(dataclasses.replace(den, renoise_floor=floor), latents, Nothing(), levels,
                                      torch.Generator().manual_seed(0), start=latents)
    torch.testing.assert_close(stock, runs[0.0], atol=1e-4, rtol=0)
    assert den.renoise_floor > 0 and float((stock - runs[den.renoise_floor]).abs().max()) > 1e-3


def test_fewstep_sdedit_of_a_text_student_and_latent_refusals(tmp_path):
    """Where no stock pipeline applies, fewstep's own sampler edits with strength: SDEdit and img2img (with a
    mask: inpainting on the latent grid) of a latent text-conditional consistency student with a prompt (encode,
    Algorithm 4, decode); pixel operators are refused on latents."""
    import pytest

    from fewstep.editing import edit
    from fewstep.export import condition

    folder, prompts = tiny_family_teacher("sd", tmp_path / "tiny-families")
    config = tiny_run_config(folder, {"name": "cd", "num_scales": 4}, steps=1, batch=2, data={"prompts": str(prompts)},
                             validation={"steps": [1], "num_images": 2, "teacher_steps": 2, "upscale": 1})
    trainer, _ = run_tiny(config, tmp_path / "run")
    hook, ctx, nets = trainer.pm.hook, trainer.ctx, trainer.nets
    teacher = nets.teacher
    image = torch.rand((2, *teacher.data_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = condition(teacher, 2, prompt=["a cat", "a dog"])
    out = edit(hook, ctx, nets, "sdedit", image, 2, strength=0.5, cond=cond, generator=torch.Generator().manual_seed(0))
    assert out.shape == image.shape and torch.isfinite(out).all()
    known = torch.ones(1, 1, *image.shape[-2:])
    known[..., : image.shape[-2] // 2, :] = 0
    out = edit(hook, ctx, nets, "img2img", image, 4, strength=0.5, mask=known, cond=cond,
               generator=torch.Generator().manual_seed(0))  # latent inpainting: the mask on the latent grid
    assert out.shape == image.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="only sdedit, img2img"):
        edit(hook, ctx, nets, "inpaint", image, 2, mask=torch.ones(1, 1, *image.shape[-2:]), cond=cond)
