"""Teacher families (fewstep.families): tiny stock pipelines saved with save_pretrained load as teachers whose
predictions are the stock pipeline's own denoiser calls; refusals name what was found and what is supported;
methods distil on every family."""

import inspect
import json
import shutil

import pytest
import torch

from fewstep.backbones import Backbone, flux_image_ids, pack_latents, unpack_latents
from fewstep.families import FAMILIES, FamilyError, detect_family
from fewstep.teacher import load_teacher
from fewstep.testing import TINY_FAMILIES, make_tiny_pipeline, tiny_pipeline

PROMPT = "a red cat"
# Families and their expected rows; flux is built as a guidance-distilled teacher with dynamic shift (Flux-dev).
OPTIONS = {"flux": {"guidance_embeds": True, "dynamic_shift": True}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {fam: make_tiny_pipeline(root / fam, fam, **OPTIONS.get(fam, {})) for fam in TINY_FAMILIES}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_detect_family_reads_the_stock_folder(folders, family):
    info = detect_family(folders[family])
    index = json.loads((folders[family] / "model_index.json").read_text())
    assert info.family.name == family
    assert info.family.pipeline_class == index["_class_name"]
    assert info.denoiser_dir.name == info.family.denoiser_component
    assert info.sample_size == 16


def _capture(pipe, **call):
    """Run the stock pipeline for one step and return the denoiser's first call: (kwargs, output)."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    seen = {}

    def pre(module, args, kwargs):
        if not seen:
            names = ("sample", "timestep") if hasattr(pipe, "unet") else ("hidden_states",)
            seen.update(dict(zip(names, args)), **{k: v for k, v in kwargs.items()})

    def post(module, args, kwargs, output):
        seen.setdefault("output", output[0] if isinstance(output, tuple) else output.sample)

    h1 = denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = denoiser.register_forward_hook(post, with_kwargs=True)
    try:
        binning = "use_resolution_binning" in inspect.signature(pipe.__call__).parameters
        extra = {"use_resolution_binning": False} if binning else {}  # PixArt/Sana bins only 256+ px sizes
        pipe(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0), **extra, **call)
    finally:
        h1.remove()
        h2.remove()
    return seen


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_teacher_denoiser_call_equals_the_stock_pipelines(folders, family):
    """The teacher's backbone, fed the teacher's own Cond, reproduces the stock pipeline's first denoiser
    call (same text states, pooled, SDXL time ids, masks, Flux packing/ids/guidance) to float rounding."""
    import diffusers

    teacher = load_teacher(folders[family])
    pipe = diffusers.DiffusionPipeline.from_pretrained(folders[family])
    guidance = 2.0 if family == "flux" else 1.0  # 1.0: no CFG batch; Flux-dev feeds it to its guidance embedding
    seen = _capture(pipe, guidance_scale=guidance)
    cond = teacher.encode_prompts([PROMPT])
    x = seen.get("sample", seen.get("hidden_states"))
    if family == "flux":
        x = unpack_latents(x, 2, 16, 16)
        torch.testing.assert_close(seen["img_ids"], flux_image_ids(8, 8, torch.device("cpu"), x.dtype))
        cond = type(cond)(**{**cond.__dict__, "guidance": torch.tensor([guidance])})
    torch.testing.assert_close(cond.embeddings, seen["encoder_hidden_states"])
    if family == "sdxl":
        torch.testing.assert_close(cond.added, seen["added_cond_kwargs"]["time_ids"])
        torch.testing.assert_close(cond.pooled, seen["added_cond_kwargs"]["text_embeds"])
    if family in ("sd3", "flux"):
        torch.testing.assert_close(cond.pooled, seen["pooled_projections"])
    if family in ("pixart_sigma", "sana"):
        torch.testing.assert_close(cond.attention_mask, seen["encoder_attention_mask"].long())
    timestep = seen["timestep"].reshape(-1)[:1].float() / teacher.family.timestep_scale
    out = teacher.net(x, timestep, cond)
    ref = seen["output"]
    if family == "flux":
        ref = unpack_latents(ref, 2, 16, 16)
    torch.testing.assert_close(out, ref[:, : out.shape[1]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "pixart_sigma", "sana"])
def test_null_condition_is_the_stock_negative_prompt(folders, family):
    """Teacher.null_cond equals the stock pipeline's unconditional half of a CFG batch (SDXL: zeros, since
    force_zeros_for_empty_prompt; SD3/PixArt/Sana: the encoded empty negative prompt)."""
    import diffusers

    teacher = load_teacher(folders[family])
    pipe = diffusers.DiffusionPipeline.from_pretrained(folders[family])
    seen = _capture(pipe, guidance_scale=3.0)
    null = teacher.null_cond(1)
    torch.testing.assert_close(null.embeddings, seen["encoder_hidden_states"][:1])
    if family == "sdxl":
        assert null.embeddings.abs().max() == 0 and null.pooled.abs().max() == 0


def test_flux_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 16, 16)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 16, 16))
    torch.testing.assert_close(unpack_latents(packed, 2, 16, 16), x)
    # FluxPipeline._unpack_latents takes pixel sizes (vae factor 8 -> 128 px for 16 latents)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 128, 128, 8), x)
    torch.testing.assert_close(flux_image_ids(8, 8, torch.device("cpu"), torch.float32),
                               FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32))


def test_flow_shift_matches_the_stock_schedulers(folders):
    """Static shift (SD3), dynamic shift at the teacher's token count (Flux-dev) and Sana's DPM-Solver flow
    sigmas become one FlowProcess whose grid is the stock scheduler's."""
    import diffusers
    import numpy as np

    for family in ("sd3", "flux"):
        teacher = load_teacher(folders[family])
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folders[family] / "scheduler")
        kwargs = {}
        if scheduler.config.use_dynamic_shifting:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = scheduler.config
            kwargs["mu"] = calculate_shift(64, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            kwargs["sigmas"] = np.linspace(1.0, 1 / 4, 4)  # FluxPipeline's grid
        scheduler.set_timesteps(4, **kwargs)
        sigmas = teacher.process.sampling_sigmas(4)
        t = sigmas / (1 + sigmas)
        if "sigmas" in kwargs:
            ours = teacher.process._shift(torch.tensor(kwargs["sigmas"], dtype=torch.float64))
            torch.testing.assert_close(ours.float(), scheduler.sigmas[:-1].float())
        else:
            torch.testing.assert_close(t[1:].float(), scheduler.sigmas[1:].float())
    sana = load_teacher(folders["sana"])
    dpm = diffusers.DPMSolverMultistepScheduler.from_pretrained(folders["sana"] / "scheduler")
    assert sana.process.kind == "flow" and sana.process.shift == dpm.config.flow_shift
    u = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(sana.process._shift(u), 3 * u / (1 + 2 * u))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_scalar_inputs_and_extra_channels_start_as_the_teacher_then_learn(folders, family):
    """The extra-scalar seam (CTM/flow-map s, guidance w, TrigFlow time) and extra input channels exist on
    every family, start as exact no-ops, and receive gradients."""
    teacher = load_teacher(folders[family])
    net = Backbone.from_config_dict(teacher.net.config_dict())
    net.load_state_dict(teacher.net.state_dict())
    cond = teacher.encode_prompts([PROMPT, "dog"])
    x = torch.randn(2, *teacher.sample_shape)
    t = torch.tensor([300.0, 700.0])
    ref = net(x, t, cond)
    net.add_scalar_inputs(["s", "w"])
    net.add_input_channels(2)
    out = net(x, t, cond, s=torch.tensor([10.0, 20.0]), w=torch.tensor([150.0, 250.0]))
    torch.testing.assert_close(out, ref)
    out.square().mean().backward()
    grads = [p.grad for p in net.scalar_embeddings.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert net.bottleneck(x, t, cond).shape[0] == 2
    levels = net.features(x, t, cond)  # LADD's heads: one map per level, batch first, square
    assert len(levels) == len(net.feature_modules()) >= 2
    assert all(f.ndim == 4 and f.shape[0] == 2 and f.shape[-1] == f.shape[-2] for f in levels)


# ------------------------------------------------------------------------------------------ refusals


def _refused(folder, *needles):
    with pytest.raises(FamilyError) as err:
        load_teacher(folder)
    for needle in (*needles, "fewstep supports", "SD3Transformer2DModel"):
        assert needle in str(err.value) or needle == "fewstep supports" and "lacks" in str(err.value), str(err.value)
    return str(err.value)


def test_refusals(folders, tmp_path):
    sdxl = shutil.copytree(folders["sdxl"], tmp_path / "refiner")
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    assert "refiner" in _refused(sdxl, "refiner")

    missing = shutil.copytree(folders["sdxl"], tmp_path / "missing")
    shutil.rmtree(missing / "text_encoder_2")
    with pytest.raises(FamilyError, match="sdxl checkpoint.*lacks text_encoder_2 \\+ tokenizer_2"):
        load_teacher(missing)

    inpaint = shutil.copytree(folders["sd"], tmp_path / "inpaint")
    config = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    _refused(inpaint, "in_channels=9", "inpainting")

    unknown = shutil.copytree(folders["sd"], tmp_path / "unknown")
    (unknown / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UVit2DModel"}))
    _refused(unknown, "'UVit2DModel'")

    fill = shutil.copytree(folders["flux"], tmp_path / "fill")
    config = json.loads((fill / "transformer" / "config.json").read_text())
    (fill / "transformer" / "config.json").write_text(json.dumps({**config, "in_channels": 96}))
    _refused(fill, "in_channels=96", "Fill")


def test_validate_refuses_an_unsupported_teacher_without_a_traceback(folders, tmp_path, capsys):
    from fewstep.cli import main

    inpaint = shutil.copytree(folders["sd"], tmp_path / "inpaint")
    config = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    (tmp_path / "prompts.txt").write_text("a red cat\na dog\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: {{name: dmd2}}\nteacher: {{pretrained: {inpaint}}}\n"
                      "data: {source: prompts.txt}\ntrain: {total_nimg: 8, batch_size: 4}\n")
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "in_channels=9" in err and "Traceback" not in err and "SD3Transformer2DModel" in err

    good = tmp_path / "good.yaml"
    good.write_text(recipe.read_text().replace(str(inpaint), str(folders["sdxl"])))
    assert main(["validate", str(good)]) == 0
    assert "sdxl" in capsys.readouterr().out


def test_tiny_pipeline_builds_every_family():
    assert set(TINY_FAMILIES) <= set(FAMILIES)
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_pipeline("kandinsky")


# ---------------------------------------------------------------------------------------- distillation


def _distil(family, method, tmp_path_factory, tmp_path):
    from fewstep.testing import run_tiny, tiny_family_teacher, tiny_run_config

    folder, prompts = tiny_family_teacher(family, tmp_path_factory.getbasetemp() / "tiny-families")
    config = tiny_run_config(folder, method, steps=2, batch=2, data={"prompts": str(prompts)},
                             validation={"steps": [1], "num_images": 2, "teacher_steps": 2, "upscale": 1})
    trainer, rec = run_tiny(config, tmp_path / "run")
    assert len(rec.logs) == 2 and all(torch.isfinite(torch.tensor(v)) for log in rec.logs for v in log.values())
    teacher = trainer.nets.teacher
    before = load_teacher(folder).net.state_dict()
    changed = [k for k, v in trainer.nets.student.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "one optimizer step changed no student weight"
    images = trainer.validate()
    assert images and all(x.shape == (2, *teacher.data_shape) and torch.isfinite(x).all() for x in images.values())
    assert any((tmp_path / "run" / "export").iterdir())
    return trainer


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cd_distils_on_every_family(family, tmp_path_factory, tmp_path):
    """Fast smoke: LCM-style consistency distillation (w input, teacher grid on VP teachers; the sigma grid on
    flow teachers) for two steps on each family, then samples and an export."""
    vp = family in ("sd", "sdxl", "pixart_sigma")
    method = {"name": "cd", "guidance": [1.0, 3.0]}
    if vp:
        method.update({"grid": "teacher", "skip": 100, "solver": "ddim", "boundary": "lcm"})
    trainer = _distil(family, method, tmp_path_factory, tmp_path)
    assert "w" in trainer.nets.student.extra_scalars


METHODS = {
    "dmd2": {"name": "dmd2"},
    "scm": {"name": "scm", "guidance": [1.0, 2.0]},  # TrigFlow tangents (JVP) through the model; w scalar input
    "ctm": {"name": "ctm"},  # target time s as a scalar input, GAN on the bottleneck, adaptive weight on output_layer
    "flowmap": {"name": "flowmap", "guidance": [1.0, 3.0]},  # s and w scalar inputs
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_methods_distil_on_every_family(family, method, tmp_path_factory, tmp_path):
    _distil(family, METHODS[method], tmp_path_factory, tmp_path)


def test_family_recipes_validate_on_the_example_pipelines(tmp_path, capsys):
    """examples/make_tiny_pipelines.py writes the folders recipes/families/*.yaml name; each recipe validates
    and reports its family."""
    import importlib.util
    from pathlib import Path

    from fewstep.cli import main

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_tiny_pipelines", root / "examples" / "make_tiny_pipelines.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([str(tmp_path / "tiny")])
    recipes = sorted((root / "recipes" / "families").glob("*.yaml"))
    assert {r.stem for r in recipes} == set(TINY_FAMILIES)
    for recipe in recipes:
        shutil.copy(recipe, tmp_path / recipe.name)
        assert main(["validate", str(tmp_path / recipe.name)]) == 0
        assert f"teacher family {recipe.stem})" in capsys.readouterr().out


def test_pixart_alpha_size_conditions_reach_the_model():
    """A PixArt transformer with resolution / aspect-ratio conditions (PixArt-alpha 1024) reads them from
    Cond.added, (h, w, h/w) in pixels, as PixArtAlphaPipeline passes them."""
    from diffusers import PixArtTransformer2DModel

    from fewstep.types import Cond

    torch.manual_seed(0)
    # the size embedding splits the width in three (resolution h, w and aspect ratio): 2 x 12 = 24 channels
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                     num_layers=1, cross_attention_dim=24, caption_channels=32, sample_size=16,
                                     patch_size=2, norm_num_groups=8, use_additional_conditions=True)
    net = Backbone(model, family="pixart_alpha")
    assert net.family.pipeline_class == "PixArtAlphaPipeline"
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 32)
    added = torch.tensor([[32.0, 32.0, 1.0], [32.0, 64.0, 0.5]])
    out = net(x, t, Cond(embeddings=text, added=added))
    ref = model(x, text, timestep=t, added_cond_kwargs={"resolution": added[:, :2], "aspect_ratio": added[:, 2:]},
                return_dict=False)[0][:, :4]
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, net(x, t, Cond(embeddings=text, added=added.flip(0))))
    with pytest.raises(ValueError, match=r"needs Cond fields \['added'\]"):
        net(x, t, Cond(embeddings=text))


def test_sd3_without_t5_feeds_zeros_as_its_pipeline(tmp_path):
    """SD3 / SD3.5 folders shipped without T5 (text_encoder_3 null in model_index.json) load; the T5 part of
    the text states is zeros, as StableDiffusion3Pipeline feeds."""
    folder = make_tiny_pipeline(tmp_path / "sd3", "sd3", with_t5=False)
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    teacher = load_teacher(folder)
    cond = teacher.encode_prompts([PROMPT])
    clip_tokens = teacher.components["tokenizer"].model_max_length
    assert cond.embeddings.shape == (1, clip_tokens + 256, 64)
    assert cond.embeddings[:, clip_tokens:].abs().max() == 0 and cond.embeddings[:, :clip_tokens].abs().max() > 0
    assert torch.isfinite(teacher.denoise(torch.randn(1, *teacher.sample_shape), 1.0, cond)).all()
