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


def test_train_stock_ddpm_example_smoke(tmp_path) -> None:
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
