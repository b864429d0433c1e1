"""Text-guided img2img and inpainting in 2-4 steps (issue 16 item 2) with a stock export: the family's stock
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline load the export's components
(``AutoPipelineFor*.from_pipe``) and run the student with the export's stock scheduler at a strength."""

from __future__ import annotations

import json

import torch

from fewstep.export import EXPORT_META
from fewstep.testing import run_tiny, tiny_family_teacher, tiny_run_config


def test_stock_img2img_and_inpaint_pipelines_run_the_exported_student(tmp_path):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

    folder, prompts = tiny_family_teacher("sd", tmp_path / "tiny-families")  # 4 latent channels, as SD
    config = tiny_run_config(folder, {"name": "dmd2", "num_steps": 4, "ratio": 1}, steps=1, batch=2,
                             data={"prompts": str(prompts)},
                             validation={"steps": [2, 4], "num_images": 2, "teacher_steps": 2, "upscale": 1})
    run_tiny(config, tmp_path / "run")
    out = tmp_path / "run" / "export"
    calls = json.loads((out / EXPORT_META).read_text())["stock"]["calls"]
    pipe = DiffusionPipeline.from_pretrained(out)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline"
    assert img2img.unet is pipe.unet and type(img2img.scheduler).__name__ == "LCMScheduler"
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    channels = pipe.vae.config.in_channels
    image = torch.rand((1, channels, size, size), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros((1, 1, size, size))
    mask[..., size // 2:, :] = 1  # diffusers convention: white (1) = repaint
    for n in ("2", "4"):
        kwargs = {k: v for k, v in calls[n].items() if k != "num_inference_steps"}
        steps = calls[n]["num_inference_steps"] if "num_inference_steps" in calls[n] else int(n)
        for p, extra in ((img2img, {}), (inpaint, {"mask_image": mask})):
            result = p(prompt=["a cat"], image=image, strength=0.5, num_inference_steps=steps, output_type="pt",
                       generator=torch.Generator().manual_seed(0), **kwargs, **extra).images
            assert result.shape == (1, channels, size, size) and torch.isfinite(result).all()


def test_fewstep_sdedit_of_a_text_student_and_latent_refusals(tmp_path):
    """Where no stock pipeline applies, fewstep's own sampler edits with strength: SDEdit of a latent
    text-conditional consistency student with a prompt (encode, Algorithm 4 without a known part, decode);
    pixel operators are refused on latents."""
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
    with pytest.raises(ValueError, match="only sdedit and interpolate"):
        edit(hook, ctx, nets, "inpaint", image, 2, mask=torch.ones(1, 1, *image.shape[-2:]), cond=cond)
