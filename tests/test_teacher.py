import json
import shutil

import pytest
import torch

from fewstep.backbones import Backbone
from fewstep.diffusion import VPProcess
from fewstep.teacher import load_teacher, save_teacher
from fewstep.testing import make_tiny_teacher, tiny_unet
from fewstep.types import Cond

B = 3


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """One folder per tiny teacher kind, built once for the module."""
    root = tmp_path_factory.mktemp("teachers")
    specs = {
        "unet": dict(backbone="unet"),
        "unet_class_edm": dict(backbone="unet", conditioning="class", process="edm"),
        "text_flow": dict(backbone="unet_condition", process="flow"),
        "dit": dict(backbone="dit", prediction_type="v_prediction"),
        "latent_dit": dict(backbone="dit", latent=True),
    }
    return {name: make_tiny_teacher(root / name, **kw) for name, kw in specs.items()}


def _cond(teacher, n: int = B) -> Cond | None:
    if teacher.conditioning == "class":
        return Cond(labels=torch.arange(n) % teacher.num_classes)
    if teacher.conditioning == "text":
        return teacher.encode_prompts(["a cat", "two dogs", "tree"][:n])
    return None


def _x_sigma(teacher, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    return torch.randn(B, *teacher.sample_shape, generator=g) * sigma.view(-1, 1, 1, 1), sigma


@pytest.mark.parametrize("name", ["unet", "unet_class_edm", "text_flow", "dit", "latent_dit"])
def test_save_load_round_trip(teachers, name, tmp_path):
    teacher = load_teacher(teachers[name])
    x, sigma = _x_sigma(teacher)
    cond = _cond(teacher)
    ref = teacher.denoise(x, sigma, cond)
    assert ref.shape == x.shape and torch.isfinite(ref).all()

    again = save_teacher(
        tmp_path / "again",
        teacher.net,
        teacher.process,
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
    )
    reloaded = load_teacher(again)
    assert (reloaded.conditioning, reloaded.num_classes) == (teacher.conditioning, teacher.num_classes)
    assert type(reloaded.process) is type(teacher.process)
    assert reloaded.process.prediction_type == teacher.process.prediction_type
    torch.testing.assert_close(reloaded.denoise(x, sigma, _cond(reloaded)), ref, rtol=0, atol=0)


def test_frozen_and_metadata(teachers):
    teacher = load_teacher(teachers["latent_dit"])
    for module in (teacher.net, teacher.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert teacher.conditioning == "class" and teacher.num_classes == 10
    assert teacher.sample_shape == (2, 4, 4) and teacher.data_shape == (1, 8, 8)
    assert teacher.source == teachers["latent_dit"].resolve()
    text = load_teacher(teachers["text_flow"])
    assert not text.text_encoder.training and not any(p.requires_grad for p in text.text_encoder.parameters())


def test_class_counts_and_null_labels(teachers):
    unet = load_teacher(teachers["unet_class_edm"])
    assert unet.num_classes == 10 and unet.net.model.config.num_class_embeds == 11
    assert json.loads((teachers["unet_class_edm"] / "fewstep_teacher.json").read_text()) == {
        "num_classes": 10
    }
    assert torch.equal(unet.null_cond(4).labels, torch.full((4,), 10))
    assert load_teacher(teachers["unet"]).null_cond(4) is None


def test_latent_encode_decode_shapes(teachers):
    teacher = load_teacher(teachers["latent_dit"])
    images = torch.rand(2, *teacher.data_shape) * 2 - 1
    z = teacher.encode(images)
    assert z.shape == (2, *teacher.sample_shape)
    assert teacher.decode(z).shape == images.shape
    pixel = load_teacher(teachers["unet"])
    assert pixel.encode(images) is images and pixel.decode(images) is images


def test_text_prompts_and_null_cond(teachers):
    teacher = load_teacher(teachers["text_flow"])
    cond = teacher.encode_prompts(["a cat", "a dog"])
    length = teacher.tokenizer.model_max_length
    assert cond.embeddings.shape == (2, length, 32) and cond.pooled.shape == (2, 32)
    assert cond.prompts == ("a cat", "a dog")
    assert (cond.embeddings[0] - cond.embeddings[1]).abs().max() > 0
    null = teacher.null_cond(3)
    assert null.embeddings.shape == (3, length, 32)
    torch.testing.assert_close(null.embeddings[2], teacher.encode_prompts([""]).embeddings[0])


@pytest.mark.parametrize("name", ["unet_class_edm", "text_flow", "dit"])
def test_classifier_free_guidance(teachers, name):
    teacher = load_teacher(teachers[name])
    x, sigma = _x_sigma(teacher)
    cond, uncond = _cond(teacher), teacher.null_cond(B)
    c = teacher.denoise(x, sigma, cond)
    u = teacher.denoise(x, sigma, uncond)
    assert (c - u).abs().max() > 1e-5
    torch.testing.assert_close(
        teacher.denoise(x, sigma, cond, uncond=uncond, guidance=1.0), c, rtol=0, atol=0
    )
    torch.testing.assert_close(
        teacher.denoise(x, sigma, cond, uncond=uncond, guidance=3.0), u + 3.0 * (c - u)
    )
    w = torch.tensor([1.0, 2.0, 4.5])
    expected = u + w.view(-1, 1, 1, 1) * (c - u)
    torch.testing.assert_close(teacher.denoise(x, sigma, cond, uncond=uncond, guidance=w), expected)
    # Without an explicit uncond the teacher guides against its own null condition.
    torch.testing.assert_close(teacher.denoise(x, sigma, cond, guidance=3.0), u + 3.0 * (c - u))


def test_guidance_of_an_unconditional_teacher_needs_autoguidance(teachers):
    teacher = load_teacher(teachers["unet"])
    x, sigma = _x_sigma(teacher)
    with pytest.raises(ValueError, match="teacher.autoguidance"):
        teacher.denoise(x, sigma, None, guidance=2.0)


@pytest.mark.parametrize("name", ["unet", "unet_class_edm", "text_flow", "dit"])
def test_autoguidance_with_the_same_model_twice_is_no_guidance(teachers, name):
    teacher = load_teacher(teachers[name], weak=teachers[name])
    assert teacher.autoguided
    x, sigma = _x_sigma(teacher)
    cond = _cond(teacher)
    plain = teacher.denoise(x, sigma, cond)
    for g in (2.0, torch.tensor([0.5, 2.0, 4.0])):
        torch.testing.assert_close(teacher.denoise(x, sigma, cond, guidance=g), plain, rtol=0, atol=1e-6)


def test_autoguidance_extrapolates_from_the_weak_model(tmp_path, teachers):
    main = teachers["unet_class_edm"]
    weak = make_tiny_teacher(tmp_path / "weak", "unet", conditioning="class", process="edm", seed=1)
    teacher = load_teacher(main, weak=weak)
    x, sigma = _x_sigma(teacher)
    cond = _cond(teacher)
    d_main = teacher.denoise(x, sigma, cond)
    d_weak = load_teacher(weak).denoise(x, sigma, cond)
    assert (d_main - d_weak).abs().max() > 1e-4
    # D_w = D_weak + w (D_main - D_weak), with the same condition for both (distribution.md §5.1); no uncond.
    torch.testing.assert_close(teacher.denoise(x, sigma, cond, guidance=2.5), d_weak + 2.5 * (d_main - d_weak))
    images = teacher.sample(torch.randn(B, *teacher.sample_shape), cond, num_steps=2, guidance=2.0)
    assert torch.isfinite(images).all()


def test_autoguidance_rejects_a_different_model(tmp_path, teachers):
    with pytest.raises(ValueError, match="does not match the teacher.*process"):
        load_teacher(teachers["unet_class_edm"], weak=make_tiny_teacher(tmp_path / "vp", "unet", conditioning="class"))
    with pytest.raises(ValueError, match="conditioning"):
        load_teacher(teachers["unet"], weak=teachers["dit"])


def test_bf16_compute_dtype(teachers):
    fp32 = load_teacher(teachers["dit"])
    bf16 = load_teacher(teachers["dit"], dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.net.parameters())
    x, sigma = _x_sigma(fp32)
    cond = _cond(fp32)
    out = bf16.denoise(x, sigma, cond, uncond=bf16.null_cond(B), guidance=2.0)
    ref = fp32.denoise(x, sigma, cond, uncond=fp32.null_cond(B), guidance=2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    latent = load_teacher(teachers["latent_dit"], dtype=torch.bfloat16)
    assert next(latent.vae.parameters()).dtype == torch.float32  # force_upcast, as in diffusers pipelines
    images = latent.sample(torch.randn(2, *latent.sample_shape), _cond(latent, 2), num_steps=2)
    assert images.shape == (2, *latent.data_shape) and torch.isfinite(images).all()
    back = bf16.to("cpu", torch.float32)
    assert back is bf16 and next(bf16.net.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["unet", "text_flow", "latent_dit"])
def test_sample_returns_finite_images(teachers, name):
    teacher = load_teacher(teachers[name])
    noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = _cond(teacher, 2)
    kwargs = {"uncond": teacher.null_cond(2), "guidance": 2.0} if cond is not None else {}
    images = teacher.sample(noise, cond, num_steps=3, **kwargs)
    assert images.shape == (2, *teacher.data_shape) and torch.isfinite(images).all()


def test_ddpm_folder_loads_with_stock_diffusers(teachers):
    from diffusers import DDPMPipeline, DiffusionPipeline

    folder = teachers["unet"]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe, DDPMPipeline)
    teacher = load_teacher(folder)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5.0, 700.0])
    torch.testing.assert_close(pipe.unet(x, t).sample, teacher.net(x, t), rtol=0, atol=0)
    assert json.loads((teachers["dit"] / "model_index.json").read_text())["_class_name"] == "FewStepTeacher"


def test_model_folder_layout(tmp_path):
    torch.manual_seed(0)
    model = tiny_unet(num_classes=4)
    model.save_pretrained(tmp_path / "model")
    process = VPProcess(prediction_type="v_prediction")
    config = json.dumps(process.scheduler_config())
    # Scheduler config next to config.json.
    (tmp_path / "model" / "scheduler_config.json").write_text(config)
    (tmp_path / "model" / "fewstep_teacher.json").write_text('{"num_classes": 4}')
    teacher = load_teacher(tmp_path / "model")
    assert teacher.process.prediction_type == "v_prediction" and teacher.num_classes == 4
    assert teacher.null_cond(2).labels.tolist() == [4, 4]
    # Scheduler config in a sibling scheduler/ folder; no metadata: every label is a real class.
    (tmp_path / "model" / "scheduler_config.json").unlink()
    (tmp_path / "model" / "fewstep_teacher.json").unlink()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(config)
    teacher = load_teacher(tmp_path / "model")
    assert teacher.num_classes == 5
    with pytest.raises(ValueError, match="null class.*fewstep_teacher.json"):
        teacher.null_cond(2)


def test_error_messages(tmp_path, teachers):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"teacher folder not found: {missing}"):
        load_teacher(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model_index.json.*nor config.json"):
        load_teacher(tmp_path / "empty")

    tiny_unet().save_pretrained(tmp_path / "bare")
    with pytest.raises(
        FileNotFoundError, match=r"no scheduler config.*scheduler/scheduler_config.json.*DDPMScheduler"
    ):
        load_teacher(tmp_path / "bare")

    pipe = shutil.copytree(teachers["unet"], tmp_path / "pipe")
    shutil.rmtree(pipe / "scheduler")
    with pytest.raises(
        FileNotFoundError, match=f"{pipe / 'scheduler' / 'scheduler_config.json'}.*save_pretrained"
    ):
        load_teacher(pipe)

    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8).save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "scheduler_config.json").write_text(json.dumps(VPProcess().scheduler_config()))
    with pytest.raises(
        ValueError, match="'AutoencoderKL'.*UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel"
    ):
        load_teacher(tmp_path / "vae")


def test_saved_backbone_keeps_extra_scalars_out_of_teacher(tmp_path):
    """A teacher saved from a backbone with extra scalars keeps them (students exported as teachers)."""
    torch.manual_seed(0)
    net = Backbone(tiny_unet(), ["s"])
    save_teacher(tmp_path / "t", net, VPProcess())
    assert load_teacher(tmp_path / "t").net.extra_scalars == ("s",)


def test_recipe_autoguidance_reaches_the_run(tmp_path, teachers):
    """teacher.autoguidance in a recipe loads the weak model; validation rows are autoguided."""
    from fewstep.testing import run_tiny, tiny_run_config

    config = tiny_run_config(teachers["unet"], {"name": "cd", "num_scales": 4}, steps=1,
                             teacher={"autoguidance": str(teachers["unet"]), "guidance": 2.0})
    trainer, _ = run_tiny(config, tmp_path / "run")
    assert trainer.nets.teacher.autoguided
    assert "teacher 2 steps" in trainer.validate()
