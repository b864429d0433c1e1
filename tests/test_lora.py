"""LoRA students with one shared frozen base (fewstep.lora), gradient checkpointing for every method, and
the diffusers LoRA export."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from fewstep.backbones import Backbone, enable_gradient_checkpointing
from fewstep.config import ConfigError, LoraConfig
from fewstep.lora import LORA_WEIGHTS, LoraBackbone, SharedBase, load_lora, materialize, save_lora
from fewstep.pairs import MANIFEST, generate_pairs
from fewstep.teacher import load_teacher
from fewstep.testing import (
    MethodConformance,
    make_tiny_teacher,
    run_tiny,
    tiny_run_config,
    tiny_unet_condition,
)
from fewstep.types import Cond

# One small configuration per method (as in each method's conformance tests), sized for 2-3 steps of batch 2.
METHODS: dict[str, dict] = {
    "diffusion": {"name": "diffusion", "solver": "euler"},
    "cd": {"name": "cd", "num_scales": 8},
    "ct": {"name": "ct", "s0": 2, "s1": 10},
    "ict": {"name": "ict", "s0": 2, "s1": 16},
    "ect": {"name": "ect", "stage_nimg": 8},
    "sct": {"name": "sct", "stage_nimg": 8},
    "scm": {"name": "scm", "mode": "scd", "warmup_nimg": 8},
    "ctm": {"name": "ctm", "gan_start_nimg": 2},
    "flowmap": {"name": "flowmap", "warmup_nimg": 8},
    "dmd": {"name": "dmd", "regression_weight": 0.0},
    "dmd2": {"name": "dmd2", "ratio": 2},
    "msd": {"name": "msd", "num_students": 2, "ratio": 2, "adm_nimg": 2},
    "guided": {"name": "guided", "stage1_nimg": 2, "round_nimg": 2, "start_steps": 4, "final_steps": 2},
    "caf": {"name": "caf", "velocity_nimg": 2, "gan_nimg": 2},
    "reflow": {"name": "reflow"},
    "kd": {"name": "kd"},
    "meanflow": {"name": "meanflow"},
    "tcm": {"name": "tcm", "stage_nimg": 8},
    "pcm": {"name": "pcm", "solver_steps": 8},
    "ladd": {"name": "ladd"},
    "add": {"name": "add", "num_steps": 2},
    "fdistill": {"name": "fdistill", "ratio": 2},
}
PAIRED = {"caf", "reflow", "kd", "ladd"}
# Each method trains LoRA adapters once in the default run, on the UNet (every kind of network set: targets, critics
# + GAN head, K students, an adaptive-weight net, a discriminator, a widened input) or on the DiT; the other
# (method, backbone) pairs under -m slow.
LORA_DEFAULT = {"dmd2": "unet", "ctm": "unet", "msd": "unet", "scm": "unet", "caf": "unet", "cd": "unet",
                "ect": "unet", "sct": "unet", "kd": "unet", "pcm": "unet", "guided": "dit", "add": "dit",
                "diffusion": "dit", "ct": "dit", "ict": "dit", "flowmap": "dit", "dmd": "dit", "reflow": "dit",
                "meanflow": "dit", "tcm": "dit", "ladd": "dit", "fdistill": "dit"}
NO_EMA = {"msd"}  # MSD refuses the evaluation EMA (it would average student 0 only)
# An LCM-style cd student with a w input (guidance range), which the stock export folds into the time biases.
LCM_W = {"name": "cd", "grid": "teacher", "boundary": "lcm", "solver": "ddim", "guidance": [2.0, 6.0],
         "sample_guidance": 3.0}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-teachers")
    # UNet: the text-conditional SD-style UNet (guided and MSD need a conditional teacher); DiT: class-conditional.
    # pixel: UNet2DModel, which has no diffusers PeftAdapterMixin (adapters through peft's inject_adapter_in_model).
    return {"unet": make_tiny_teacher(root / "unet", "unet_condition"), "dit": make_tiny_teacher(root / "dit", "dit"),
            "pixel": make_tiny_teacher(root / "pixel", "unet")}


def pairs_for(teacher_path: Path) -> Path:
    out = teacher_path.parent / f"{teacher_path.name}-pairs"
    if not (out / MANIFEST).is_file():
        teacher = load_teacher(teacher_path)
        prompts = ["zero", "one"] if teacher.conditioning == "text" else None
        generate_pairs(teacher, out, 8, num_steps=2, prompts=prompts)
    return out


def method_config(name: str, teacher: Path, *, steps: int | None = None, lora: dict | None = None, **sections):
    if name in PAIRED:
        sections["data"] = {**sections.get("data", {}), "pairs": str(pairs_for(teacher))}
    if name in NO_EMA:
        sections["plugins"] = {"disable": ["ema"]}
    sections.setdefault("export", {"enabled": False})
    sections.setdefault("validation", {"steps": [1], "teacher_steps": None})
    extra = {} if lora is None else {"lora": lora}
    steps = steps or (3 if name == "caf" else 2)  # CAF: velocity, acceleration and GAN phases
    return tiny_run_config(teacher, METHODS[name], steps=steps, batch=2, **extra, **sections)


def assert_gradients_where_due(trainer, rec) -> None:
    assert rec.grads
    for group_name, has in rec.grads:
        assert not has.pop("teacher"), f"group {group_name}: a gradient reached the teacher's weights"
        for name, flag in has.items():
            assert flag == (name in trainer.groups[group_name].modules), f"group {group_name!r}: {name} grad={flag}"


# ------------------------------------------------------------------------------------------------ the view


def text_backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone(tiny_unet_condition(8, 1, 32))


def test_view_starts_as_its_base_and_switches_adapters_per_forward():
    teacher = text_backbone()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 20.0])
    cond = Cond(embeddings=torch.randn(2, 16, 32))
    ref = teacher(x, t, cond).detach()
    base = SharedBase(teacher.model, LoraConfig(rank=4), ["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    a = LoraBackbone(base, teacher)
    torch.testing.assert_close(a(x, t, cond), ref)  # B = 0 at init: the student is its teacher
    b = copy.deepcopy(a)
    assert b.adapter != a.adapter and b.model is a.model
    with torch.no_grad():
        for p in b.lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out_a, out_b = a(x, t, cond), b(x, t, cond)
    torch.testing.assert_close(out_a, ref)
    assert not torch.allclose(out_b, ref, atol=1e-4)
    torch.testing.assert_close(teacher(x, t, cond), ref)  # outside a view: every adapter is off
    torch.testing.assert_close(materialize(b)(x, t, cond), out_b, rtol=1e-4, atol=1e-5)
    # Only adapter weights are parameters / state of a view; the frozen base is not.
    assert {k.split(".")[0] for k in a.state_dict()} == {"lora"}
    assert all(".lora_" in n for n, _ in teacher.named_parameters() if _.requires_grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_land_on_the_adapter_of_each_forward(checkpointing):
    """Two adapters used in one graph, one frozen (as the fake score on the generator's turn): the gradient of
    a loss through both equals the one computed with each adapter on its own copy, and the frozen one gets none."""
    teacher = text_backbone()
    base = SharedBase(teacher.model, LoraConfig(rank=4, init="gaussian"), ["to_q", "to_v", "conv1", "conv2"])
    gen = LoraBackbone(base, teacher)
    with torch.no_grad():
        for p in gen.lora.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fake = copy.deepcopy(gen)
    with torch.no_grad():
        for p in fake.lora.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fake.requires_grad_(False)
    if checkpointing:
        enable_gradient_checkpointing(gen)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([700.0, 300.0])
    cond = Cond(embeddings=torch.randn(2, 16, 32))
    (fake(gen(x, t, cond), t, cond).square().mean() + gen(x, t, cond).mean()).backward()
    grads = {n: p.grad.clone() for n, p in gen.named_parameters()}
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.grad is None for n, p in teacher.named_parameters() if ".lora_" not in n)
    # Reference: two independent full networks with the adapters merged in; chain rule through W + delta.
    g_full, f_full = materialize(gen), materialize(fake).requires_grad_(False)
    y = g_full(x, t, cond)
    (f_full(y, t, cond).square().mean() + g_full(x, t, cond).mean()).backward()
    for path, layer in gen.base.layers:
        if gen.adapter not in layer.lora_A:
            continue
        key = path.replace(".", "-")
        a, b = gen.lora[key]["lora_A"].weight, gen.lora[key]["lora_B"].weight
        dw = g_full.model.get_submodule(path).weight.grad
        scale = layer.scaling[gen.adapter]
        dw2 = dw.reshape(dw.shape[0], -1)
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        torch.testing.assert_close(grads[f"lora.{key}.lora_B.weight"].reshape(b2.shape), scale * dw2 @ a2.T.detach(),
                                   rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(grads[f"lora.{key}.lora_A.weight"].reshape(a2.shape), scale * b2.T.detach() @ dw2,
                                   rtol=1e-3, atol=1e-6)


def test_config_refuses_unknown_fields_and_bad_networks(teachers, tmp_path):
    with pytest.raises(ConfigError, match="lora.ranks: unknown field"):
        tiny_run_config(teachers["unet"], {"name": "cd"}, lora={"ranks": 4})
    cfg = method_config("dmd2", teachers["unet"], lora={"rank": 4, "networks": ["student", "gan_head"]})
    with pytest.raises(ValueError, match="gan_head"):
        run_tiny(cfg, tmp_path / "run")
    small = {**METHODS["msd"], "width": 0.5, "tsm_nimg": 2}
    cfg = tiny_run_config(teachers["unet"], small, steps=3, batch=2, lora={"rank": 4}, plugins={"disable": ["ema"]})
    with pytest.raises(ValueError, match="not a copy of the teacher"):
        run_tiny(cfg, tmp_path / "small")


@pytest.mark.slow
def test_unlisted_trainable_copies_are_full_networks(teachers, tmp_path):
    cfg = method_config("dmd2", teachers["unet"], lora={"rank": 4, "networks": ["student"]})
    trainer, rec = run_tiny(cfg, tmp_path / "run")
    assert isinstance(trainer.nets.student, LoraBackbone) and isinstance(trainer.nets.ema, LoraBackbone)
    fake = trainer.nets.extra["fake_score"]
    assert type(fake) is Backbone and all(p.requires_grad for p in fake.parameters())
    assert_gradients_where_due(trainer, rec)


# ------------------------------------------------------------------------------- every method, LoRA and checkpointing


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_gradient_checkpointing(method, teachers, tmp_path):
    trainer, rec = run_tiny(method_config(method, teachers["unet"], train={"gradient_checkpointing": True}),
                            tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(v)) for log in rec.logs for v in log.values() if isinstance(v, float))
    assert_gradients_where_due(trainer, rec)


@pytest.mark.parametrize("method, backbone", [
    pytest.param(m, b, marks=() if LORA_DEFAULT[m] == b else pytest.mark.slow)
    for b in ("unet", "dit") for m in sorted(METHODS)])
def test_every_method_trains_lora_adapters_on_one_base(method, backbone, teachers, tmp_path):
    """LoRA + gradient checkpointing: finite losses, gradients only where due and never on the teacher's
    weights, every copy of the student an adapter on the one frozen base (the teacher's model, or the
    student's own for a widened input), and the student's adapter moved by training."""
    cfg = method_config(method, teachers[backbone], lora={"rank": 4},
                        train={"gradient_checkpointing": True})
    trainer, rec = run_tiny(cfg, tmp_path / "run")
    assert_gradients_where_due(trainer, rec)
    views = [n for n in trainer.nets.names() if isinstance(trainer.nets.get(n), LoraBackbone)]
    assert "student" in views
    assert len({id(trainer.nets.get(n).model) for n in views}) == 1
    student = trainer.nets.student
    if not student.extra_channels:
        assert student.model is trainer.nets.teacher.net.model
    assert any(p.abs().sum() > 0 for v in views for n, p in trainer.nets.get(v).lora.named_parameters()
               if "lora_B" in n)  # some adapter trained (MSD's generators step on later steps only)
    assert not any(p.requires_grad for n, p in student.model.named_parameters() if ".lora_" not in n)


class _LoraConformance(MethodConformance):
    """The shared method contract (finite losses, gradients only where due, determinism, resume, sampler and
    export) on all three tiny backbones, with the networks as LoRA adapters on one base."""

    pytestmark = pytest.mark.slow
    steps = 3

    def config(self, teacher, **sections):
        return super().config(teacher, lora={"rank": 4}, **sections)


class TestDMD2LoraConformance(_LoraConformance):
    method = {"name": "dmd2", "ratio": 2}


class TestCTMLoraConformance(_LoraConformance):
    method = {"name": "ctm", "gan_start_nimg": 4}


def test_lora_resume_is_bit_identical(teachers, tmp_path):
    every = {"checkpoint_every_nimg": 4, "keep_checkpoints": 10}
    cfg = method_config("dmd2", teachers["pixel"], steps=4, lora={"rank": 4}, train=every)
    full, rec_full = run_tiny(cfg, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for later in sorted((tmp_path / "resumed" / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)
    saved = next((tmp_path / "resumed" / "checkpoints").glob("step-*")) / "nets" / "student.safetensors"
    assert saved.stat().st_size < 200_000  # adapter weights only, not the base
    resumed, rec_res = run_tiny(cfg, tmp_path / "resumed", resume=True)
    assert rec_res.logs == rec_full.logs[2:]
    for name in full.nets.names():
        for k, v in full.nets.get(name).state_dict().items():
            assert torch.equal(v, resumed.nets.get(name).state_dict()[k]), f"{name}.{k}"


# ---------------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def latent_text_teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("sd") / "teacher", "unet_condition", latent=True)


def test_lcm_style_lora_student_keeps_w_in_its_own_embedding(latent_text_teacher, tmp_path):
    """A full LCM-style student on an SD UNet reads w through a new time_embedding.cond_proj; a LoRA student's frozen
    base is the teacher's UNet, which has none: its w stays a fewstep embedding, folded by the stock export."""
    trainer, _ = run_tiny(tiny_run_config(latent_text_teacher, LCM_W, steps=2, lora={"rank": 4}), tmp_path / "run")
    student = trainer.nets.student
    assert isinstance(student, LoraBackbone) and not student.native_guidance
    assert list(student.scalar_embeddings) == ["w"]
    assert student.model is trainer.nets.teacher.net.model and student.model.config.time_cond_proj_dim is None
    meta = json.loads((tmp_path / "run" / "export" / "fewstep_export.json").read_text())
    assert meta["stock"]["folded_scalars"] == {"w": 300.0} and meta["stock"]["calls"]["1"]["guidance_scale"] == 1.0


def stock_pipeline(teacher_path: Path, scheduler_cls):
    """The teacher as diffusers' stock StableDiffusionPipeline (the tiny teacher's folder is not one)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    teacher = load_teacher(teacher_path)
    scheduler = scheduler_cls.from_config({**teacher.process.scheduler_config(), "timestep_spacing": "trailing"})
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(teacher_path / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(teacher_path / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(teacher_path / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(teacher_path / "unet"), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


EXPORTED = {
    "cd": {"name": "cd", "grid": "teacher", "skip": 100, "solver": "ddim", "boundary": "lcm"},
    "dmd2": {"name": "dmd2", "ratio": 2},
}


@pytest.mark.parametrize("method", sorted(EXPORTED))
def test_stock_pipeline_with_load_lora_weights_matches_fewstep(method, latent_text_teacher, tmp_path):
    """One step: the teacher's stock StableDiffusionPipeline + LCMScheduler + load_lora_weights(export) draws
    the latents fewstep's sampler draws from the same noise; the LoRA also loads into a perturbed teacher."""
    from diffusers import LCMScheduler

    from fewstep.sampling import sampling_net

    cfg = tiny_run_config(latent_text_teacher, EXPORTED[method], steps=2, batch=2, lora={"rank": 4},
                          export={"enabled": False}, plugins={"disable": ["ema"]})
    trainer, _ = run_tiny(cfg, tmp_path / "run")
    net = sampling_net(trainer.nets)
    with torch.no_grad():  # a visible adapter: two training steps barely move B away from zero
        for n, p in net.lora.named_parameters():
            if "lora_B" in n:
                p.add_(0.02 * torch.randn_like(p))
    out = tmp_path / "lora"
    save_lora(net, out)
    assert (out / LORA_WEIGHTS).is_file()
    prompts = ["one", "two"]
    noise = torch.randn(2, *trainer.nets.teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.nets.teacher.encode_prompts(prompts)
    with torch.no_grad():
        ours = trainer.pm.hook.fewstep_sample(ctx=trainer.ctx, nets=trainer.nets, noise=noise, cond=cond,
                                              num_steps=1, generator=torch.Generator().manual_seed(0))
    pipe = stock_pipeline(latent_text_teacher, LCMScheduler)
    plain = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="latent").images
    pipe.load_lora_weights(out)
    stock = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="latent").images
    torch.testing.assert_close(stock, ours.float(), rtol=1e-3, atol=2e-3)
    assert (stock - plain).abs().max() > 1e-3  # the adapter is what makes them agree
    # A different fine-tune of the same base (perturbed teacher weights) takes the adapter: its denoiser moves
    # by the adapter's change of the original's (to first order in the perturbation).
    x, t = torch.randn(2, *trainer.nets.teacher.sample_shape), torch.tensor([999.0, 500.0])
    ehs = cond.embeddings.float()
    lora_unet, other = pipe.unet, stock_pipeline(latent_text_teacher, LCMScheduler)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(1e-4 * torch.randn_like(p))
        fine = other.unet(x, t, encoder_hidden_states=ehs).sample
        other.load_lora_weights(out)
        fine_lora = other.unet(x, t, encoder_hidden_states=ehs).sample
        lora_unet.disable_lora()
        orig = lora_unet(x, t, encoder_hidden_states=ehs).sample
        lora_unet.enable_lora()
        orig_lora = lora_unet(x, t, encoder_hidden_states=ehs).sample
    delta = (orig_lora - orig).abs().max()
    assert (fine - orig).abs().max() > 1e-4 and delta > 1e-3
    assert ((fine_lora - fine) - (orig_lora - orig)).abs().max() < 0.05 * delta


def visible_adapter(net: LoraBackbone) -> None:
    """Move the adapter (and extra scalar embeddings) away from the two-step trained state, where B is barely off
    zero, so that a stock pipeline without the adapter would visibly differ."""
    with torch.no_grad():
        for n, p in net.lora.named_parameters():
            if "lora_B" in n:
                p.add_(0.02 * torch.randn_like(p))
        for p in net.scalar_embeddings.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize(("family", "method"), [("sd", "sct"), ("sd", "ctm"),
                                               pytest.param("sd3", "ctm", marks=pytest.mark.slow)])
def test_fewstep_pipeline_with_load_lora_weights_matches_fewstep(family, method, latent_text_teacher,
                                                                 tmp_path_factory, tmp_path):
    """sCT (CM boundary at the VP teacher's top level: f = 0.998 D + 1e-4 x_t, which LCMScheduler's one-parameter
    boundary cannot match) and CTM ((t, s) sampler) export a FewStepPipeline. Built on the teacher's own denoiser,
    ``load_lora_weights(export)`` gives it the adapter (and CTM's s embedding, fewstep_lora_scalars.safetensors):
    its images are fewstep's for the same noise and prompts, at 1 and 2 steps; a perturbed teacher takes it too.
    SD3: a transformer denoiser takes the adapter through its load_lora_adapter."""
    import diffusers

    from fewstep.export import EXPORT_META, FewStepPipeline, export_run
    from fewstep.lora import SCALARS_FILE
    from fewstep.sampling import generate, sampling_net
    from fewstep.testing import tiny_family_teacher

    sections = {"export": {"enabled": False}, "validation": {"steps": [1], "teacher_steps": None}}
    if family == "sd":
        teacher = latent_text_teacher
    else:
        teacher, prompt_file = tiny_family_teacher(family, tmp_path_factory.getbasetemp() / "tiny-families")
        sections["data"] = {"prompts": str(prompt_file)}
    trainer, _ = run_tiny(tiny_run_config(teacher, METHODS[method], steps=2, batch=2, lora={"rank": 4}, **sections),
                          tmp_path / "run")
    net = sampling_net(trainer.nets)
    visible_adapter(net)
    out = export_run(trainer.pm.hook, trainer.ctx, trainer.nets, tmp_path / "export")
    meta = json.loads((out / EXPORT_META).read_text())
    assert meta["pipeline"] == "FewStepPipeline"
    assert (out / SCALARS_FILE).is_file() == bool(net.extra_scalars)
    component = meta["component"]
    model_class = getattr(diffusers, json.loads((out / "model_index.json").read_text())[component][1])
    prompts = ["one", "two"]
    noise = torch.randn(2, *trainer.nets.teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.nets.teacher.encode_prompts(prompts)

    def images(pipe, steps):
        return pipe(prompt=prompts, num_inference_steps=steps, latents=noise, generator=torch.Generator().manual_seed(5),
                    output_type="pt").images

    def pipeline(scale=0.0, lora=False):
        """The export's FewStepPipeline on the teacher's denoiser (perturbed by scale * N(0, 1) from seed 7)."""
        model = model_class.from_pretrained(teacher / component)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        pipe = FewStepPipeline.from_pretrained(out, **{component: model})
        if lora:
            pipe.load_lora_weights(out)
        return pipe

    pipe, plain = pipeline(lora=True), pipeline()
    for steps in (1, 2):
        ours = (generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, cond, steps,
                         generator=torch.Generator().manual_seed(5)).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(images(pipe, steps), ours, rtol=0, atol=1e-5)
        assert (images(plain, steps) - ours).abs().max() > 1e-2  # the adapter is what makes them agree
    # A different fine-tune of the same base (perturbed teacher weights) takes the adapter: its images move by the
    # adapter's change of the original's (to first order in the perturbation).
    fine, fine_lora = pipeline(1e-4), pipeline(1e-4, lora=True)
    delta = images(pipe, 1) - images(plain, 1)
    assert (images(fine, 1) - images(plain, 1)).abs().max() > 1e-5
    assert ((images(fine_lora, 1) - images(fine, 1)) - delta).abs().max() < 0.05 * delta.abs().max()


#: Families' stock pipelines (SD's: the tests above); PixArt's has no diffusers LoRA loader (nor has DiTPipeline).
LORA_FAMILIES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline",
                 "pixart_sigma": "PixArtSigmaPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in ("sd3", "flux") else pytest.mark.slow)
                                    for f in LORA_FAMILIES])
def test_family_pipeline_loads_the_lora_and_matches_fewstep(family, tmp_path_factory, tmp_path):
    """DMD2-LoRA (1 step) on a tiny SD3 / Flux / Sana / PixArt-Sigma / SDXL teacher: the family's stock pipeline (the
    teacher folder itself) with the export's scheduler and ``load_lora_weights(export)`` (SD3LoraLoaderMixin /
    FluxLoraLoaderMixin / SanaLoraLoaderMixin / StableDiffusionXLLoraLoaderMixin key names; PixArt, which has no
    diffusers loader: fewstep.lora.load_lora) draws fewstep's images for the same noise and prompts."""
    import diffusers

    from fewstep.export import EXPORT_META, condition, export_run
    from fewstep.sampling import generate, sampling_net
    from fewstep.testing import tiny_family_teacher

    folder, prompts = tiny_family_teacher(family, tmp_path_factory.getbasetemp() / "tiny-families")
    cfg = tiny_run_config(folder, {"name": "dmd2", "num_steps": 1, "ratio": 1}, steps=1, batch=2, lora={"rank": 4},
                          data={"prompts": str(prompts)}, export={"enabled": False}, plugins={"disable": ["ema"]},
                          validation={"steps": [1], "teacher_steps": None})
    trainer, _ = run_tiny(cfg, tmp_path / "run")
    visible_adapter(sampling_net(trainer.nets))
    out = export_run(trainer.pm.hook, trainer.ctx, trainer.nets, tmp_path / "export")
    stock = json.loads((out / EXPORT_META).read_text())["stock"]
    teacher = trainer.nets.teacher
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == LORA_FAMILIES[family]
    pipe.scheduler = getattr(diffusers, stock["scheduler"]).from_pretrained(out / "scheduler")
    latents = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    call = {**stock["calls"]["1"], "prompt": ["a cat", "two dogs"], "output_type": "pt",
            "generator": torch.Generator().manual_seed(0)}  # a pipeline that takes no latents draws these from it
    if stock["takes_latents"]:
        call["latents"] = latents
    plain = pipe(**call).images
    if family == "pixart_sigma":  # no diffusers loader, neither on the pipeline nor on its transformer: peft's
        assert not hasattr(pipe, "load_lora_weights") and not hasattr(pipe.transformer, "load_lora_adapter")
        load_lora(pipe.transformer, out)
    else:
        pipe.load_lora_weights(out)
    call["generator"] = torch.Generator().manual_seed(0)
    theirs = pipe(**call).images
    ours = generate(trainer.pm.hook, trainer.ctx, trainer.nets, latents / stock["latents_scale"]["1"],
                    condition(teacher, 2, None, call["prompt"]), 1)
    ours = (ours.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=1e-4)
    assert (plain.float() - ours).abs().max() > 1e-3  # the adapter is what makes them agree


def test_pixel_unet_lora_card_names_a_loader_that_works(teachers, tmp_path):
    """A UNet2DModel teacher's stock pipelines (DDPM, consistency) have no ``load_lora_weights``: the model card
    names ``fewstep.lora.load_lora(pipe.unet, ...)``, and that puts the adapter into the teacher's UNet so it
    computes what the export's fused UNet computes."""
    from diffusers import DDPMPipeline, UNet2DModel

    cfg = tiny_run_config(teachers["pixel"], {"name": "dmd2", "ratio": 2}, steps=2, batch=2, lora={"rank": 4},
                          plugins={"disable": ["ema"]})
    run_tiny(cfg, tmp_path / "run")
    out = tmp_path / "run" / "export"
    card = (out / "README.md").read_text()
    assert 'fewstep.lora.load_lora(pipe.unet, "<this folder>")' in card and "load_lora_weights" not in card
    pipe = DDPMPipeline.from_pretrained(teachers["pixel"])
    assert not hasattr(pipe, "load_lora_weights")
    fused = UNet2DModel.from_pretrained(out / "unet")
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500])
    with torch.no_grad():
        before = pipe.unet(x, t).sample
        load_lora(pipe.unet, out)
        torch.testing.assert_close(pipe.unet(x, t).sample, fused(x, t).sample, rtol=1e-4, atol=1e-5)
    assert (before - fused(x, t).sample).abs().max() > 1e-4  # the adapter is what makes them agree


def test_export_writes_fused_pipeline_and_lora_file(latent_text_teacher, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = tiny_run_config(latent_text_teacher, {"name": "dmd2", "ratio": 2}, steps=2, batch=2, lora={"rank": 4})
    trainer, _ = run_tiny(cfg, tmp_path / "run")
    out = tmp_path / "run" / "export"
    assert (out / LORA_WEIGHTS).is_file()
    fused = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not any("lora" in k for k in fused.state_dict())
    assert "load_lora_weights" in (out / "README.md").read_text()
    # lora.export: adapter writes the LoRA file alone.
    import dataclasses

    from fewstep.export import export_run

    config = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"export": "adapter"})})
    alone = export_run(trainer.pm.hook, dataclasses.replace(trainer.ctx, config=config), trainer.nets,
                       tmp_path / "adapter")
    assert sorted(p.name for p in Path(alone).iterdir()) == [LORA_WEIGHTS]


@pytest.mark.parametrize("method", ["sct", "ctm", "cd-w"])
def test_adapter_only_export_is_refused_before_training_where_the_lora_is_not_the_student(method,
                                                                                         latent_text_teacher,
                                                                                         tmp_path):
    """``lora.export: adapter`` writes only the LoRA file, for the teacher's stock pipeline. sCT on a VP teacher (CM
    boundary no stock scheduler matches), CTM (its s input, which no stock model takes) and an LCM-style student with a w
    embedding (folded into the fused export's time biases, which the LoRA format cannot carry) are not the teacher
    plus that adapter: refused at setup, before the first step, saying to use ``export: both``; and refused by
    ``fewstep export`` of such a run, before writing anything."""
    from fewstep.export import export_run
    from fewstep.plugin import build_manager
    from fewstep.testing import Recorder
    from fewstep.trainer import Trainer

    spec = LCM_W if method == "cd-w" else METHODS[method]
    why = {"sct": "declares no stock diffusers scheduler",
           "ctm": "reads the scalar inputs \\['s'\\], which no stock diffusers model takes",
           "cd-w": "folds the constant scalar inputs \\{'w': 300.0\\}"}[method]
    config = tiny_run_config(latent_text_teacher, spec, steps=2, batch=2, lora={"rank": 4, "export": "adapter"},
                             validation={"steps": [1], "teacher_steps": None})
    pm = build_manager(config.method.name)
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    trainer = Trainer(config, pm, tmp_path / "run")
    with pytest.raises(ValueError, match=f"lora.export: adapter .*{why}.*Set lora.export: both"):
        trainer.fit()
    assert recorder.logs == [] and not (tmp_path / "run" / "checkpoints").exists()
    # A run trained with another export setting, exported with lora.export: adapter.
    quiet = config.model_copy(update={"export": config.export.model_copy(update={"enabled": False})})
    trainer = Trainer(quiet, build_manager(config.method.name), tmp_path / "run2")
    trainer.setup()
    with pytest.raises(ValueError, match=f"{why}.*Set lora.export: both"):
        export_run(trainer.pm.hook, trainer.ctx, trainer.nets, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (fp32 in the other tests)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_base_with_float32_adapters(teachers, tmp_path, fresh_accelerate):
    """Mixed precision: the shared base is the teacher in bf16, the adapters stay float32 and train."""
    cfg = method_config("dmd2", teachers["unet"], lora={"rank": 4}, train={"mixed_precision": "bf16"})
    trainer, rec = run_tiny(cfg, tmp_path / "run")
    student = trainer.nets.student
    assert student.model is trainer.nets.teacher.net.model and student.model.dtype == torch.bfloat16
    for name in ("student", "fake_score", "ema"):
        assert all(p.dtype == torch.float32 for p in trainer.nets.get(name).parameters()), name
    assert all(torch.isfinite(torch.tensor(v)) for log in rec.logs for v in log.values() if isinstance(v, float))
    assert_gradients_where_due(trainer, rec)
