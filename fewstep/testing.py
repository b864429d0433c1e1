"""Test helpers shipped with fewstep, for its own tests and for plugin authors.

Tiny diffusers models (each builds in well under 0.5 s on one CPU thread) and
:func:`make_tiny_teacher`, which writes a complete teacher folder that :func:`fewstep.teacher.load_teacher`
reads. Everything is built in-process: no file is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from fewstep.hookspecs import hookimpl

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = ["FLUX_DEV_OPTIONS", "TINY_FAMILIES", "MethodConformance", "Recorder", "assert_ranks_match", "make_tiny_pipeline", "make_tiny_teacher",
           "run_on_ranks", "run_tiny", "tiny_clip", "tiny_clip_with_projection", "tiny_dit", "tiny_gemma2", "tiny_pipeline",
           "tiny_run_config", "tiny_pairs", "tiny_family_pairs", "tiny_family_teacher", "tiny_t5", "tiny_unet", "tiny_unet_condition", "tiny_vae", "tiny_vae_rgb",
           "write_digit_prompts"]

TINY_NUM_CLASSES = 10
TINY_TEXT_LENGTH = 16
#: Teacher families :func:`tiny_pipeline` builds (rows of fewstep.families.FAMILIES), in that table's order.
TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart_sigma", "sana")


def tiny_unet(sample_size: int = 8, channels: int = 1, num_classes: int | None = None) -> UNet2DModel:
    """Two-level UNet2DModel with one attention level; class-conditional when ``num_classes`` is
    given, with ``num_classes + 1`` label embeddings (the last one is the null class)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def tiny_unet_condition(
    sample_size: int = 8, channels: int = 1, cross_attention_dim: int = 32
) -> UNet2DConditionModel:
    """Two-level text-conditional UNet2DConditionModel (cross-attention at the first level and the middle)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def tiny_dit(
    sample_size: int = 8, channels: int = 1, num_classes: int = TINY_NUM_CLASSES, learned_sigma: bool = False
) -> DiTTransformer2DModel:
    """Two-block DiT, patch size 2, 2 heads of 8 channels. diffusers' label embedder always has a
    null row (index ``num_classes``). ``learned_sigma`` doubles the output channels as in DiT-XL/2."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=channels,
        out_channels=2 * channels if learned_sigma else channels,
        num_layers=2,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )


def tiny_clip(hidden_size: int = 32) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A 2-layer CLIP text encoder and a character-level CLIP tokenizer (max length 16).

    The tokenizer is built in memory from a vocabulary of lower-case letters, digits and a few
    punctuation marks (each also as a word end ``x</w>``) and no merges: enough to turn any short
    prompt into distinct ids; other characters map to the unknown token. It saves and reloads with
    ``save_pretrained`` / ``from_pretrained`` like any CLIP tokenizer.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'":
            vocab[ch + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TEXT_LENGTH)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_TEXT_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval(), tokenizer


def tiny_vae(channels: int = 1, latent_channels: int = 2, sample_size: int = 8) -> AutoencoderKL:
    """Two-block AutoencoderKL: downsamples by 2; ``scaling_factor`` 1.0 (no data to measure one)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=1.0,
    )


def make_tiny_teacher(
    folder: str | Path,
    backbone: str = "unet",
    *,
    process: str = "vp",
    prediction_type: str | None = None,
    conditioning: str | None = None,
    latent: bool = False,
    sample_size: int = 8,
    channels: int = 1,
    seed: int = 0,
    process_options: dict[str, Any] | None = None,
) -> Path:
    """Write a random tiny teacher folder and return it.

    backbone: "unet" (unconditional, or class-conditional with ``conditioning="class"``),
        "unet_condition" (text-conditional, with :func:`tiny_clip`) or "dit" (class-conditional).
    process: "vp" | "edm" | "flow" with their default settings; prediction_type: passed to VP / EDM
        when given (flow always predicts velocity); process_options: other keyword arguments of the
        process class (e.g. ``{"timestep_scale": 1000.0}`` for an EDM teacher in the OpenAI convention).
    latent: add a :func:`tiny_vae`; ``sample_size`` and ``channels`` describe the data (pixel) space,
        the backbone works on the latents (half the size, 2 channels).
    Class-conditional teachers have 10 classes (plus the null class).
    """
    from fewstep.backbones import Backbone
    from fewstep.diffusion import EDMProcess, FlowProcess, VPProcess
    from fewstep.teacher import save_teacher

    expected = {"unet": ("none", "class"), "unet_condition": ("text",), "dit": ("class",)}
    if backbone not in expected:
        raise ValueError(f"backbone must be one of {list(expected)}, got {backbone!r}")
    conditioning = conditioning or expected[backbone][0]
    if conditioning not in expected[backbone]:
        raise ValueError(
            f"backbone {backbone!r} supports conditioning {expected[backbone]}, got {conditioning!r}"
        )
    processes = {"vp": VPProcess, "edm": EDMProcess, "flow": FlowProcess}
    if process not in processes:
        raise ValueError(f"process must be one of {list(processes)}, got {process!r}")

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = tiny_vae(channels, sample_size=sample_size) if latent else None
        size = sample_size // 2 if latent else sample_size
        model_channels = vae.config.latent_channels if vae is not None else channels
        text_encoder = tokenizer = None
        num_classes = None
        if backbone == "unet":
            num_classes = TINY_NUM_CLASSES if conditioning == "class" else None
            model = tiny_unet(size, model_channels, num_classes)
        elif backbone == "unet_condition":
            text_encoder, tokenizer = tiny_clip()
            model = tiny_unet_condition(size, model_channels, text_encoder.config.hidden_size)
        else:
            num_classes = TINY_NUM_CLASSES
            model = tiny_dit(size, model_channels, num_classes)
    if process == "flow":
        if prediction_type not in (None, "flow"):
            raise ValueError(
                f"a flow process predicts velocity (prediction_type 'flow'), got {prediction_type!r}"
            )
        noise = FlowProcess()
    else:
        noise = processes[process](
            **({} if prediction_type is None else {"prediction_type": prediction_type}), **(process_options or {})
        )
    net = Backbone(model, num_classes=num_classes)
    return save_teacher(Path(folder), net, noise, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------
# Run harness and the conformance test base class for method plugins


def tiny_run_config(teacher_path: str | Path | None, method: dict[str, Any], /, *, steps: int = 3, batch: int = 4,
                    seed: int = 0, **sections: dict[str, Any]) -> Any:
    """A validated RunConfig for a few CPU steps on a subset of the digits data. ``sections`` update
    whole recipe sections (``train={...}``, ``teacher={"guidance": 2.0}``...)."""
    from fewstep.config import validate_config
    from fewstep.plugin import discover, method_registry

    data: dict[str, Any] = {
        "method": method,
        "teacher": {"pretrained": None if teacher_path is None else str(teacher_path)},
        "data": {"source": "digits", "limit": 64},
        "train": {"total_nimg": steps * batch, "batch_size": batch, "seed": seed, "progress_bar": False,
                  "log_every_nimg": batch},
        "validation": {"steps": [1, 2], "num_images": 4, "teacher_steps": 2, "upscale": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return validate_config(data, method_registry(discover()))


class Recorder:
    """An observer plugin that keeps every step's logs and, per optimizer step, which networks hold
    gradients (the trainer calls ``fewstep_after_optimizer_step`` before zeroing them)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.grads: list[tuple[str, dict[str, bool]]] = []

    @hookimpl
    def fewstep_on_step_end(self, step, logs) -> None:
        self.logs.append({"step": step.step, **logs})

    @hookimpl
    def fewstep_after_optimizer_step(self, group, nets) -> None:
        has = {name: any(p.grad is not None for p in nets.get(name).parameters()) for name in nets.names()}
        # The teacher's own weights: LoRA adapters of other networks may live in its model (fewstep.lora).
        has["teacher"] = any(p.grad is not None for n, p in nets.teacher.net.named_parameters() if ".lora_" not in n)
        self.grads.append((group.name, has))


def run_tiny(config: Any, run_dir: Path, *, resume: bool = False) -> tuple[Any, Recorder]:
    """Train ``config`` in ``run_dir``; returns the trainer and a :class:`Recorder` of the run."""
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable)
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    trainer = Trainer(config, pm, run_dir, resume=resume)
    trainer.fit()
    return trainer, recorder


def run_on_ranks(config: Any, run_dir: Path, out_dir: Path, networks: tuple[str, ...] = ("student",),
                 num_processes: int = 2) -> list[dict[str, torch.Tensor]]:
    """Train ``config`` with ``num_processes`` CPU processes (gloo DDP through ``accelerate.debug_launcher``,
    which forks and uses a fixed port: never run two of these at once) into ``run_dir``; returns each rank's
    final state of ``networks`` as {"<network>.<key>": tensor}, saved to ``out_dir`` by the rank. Each rank
    also checks that it trained with world size ``num_processes``."""
    from accelerate import debug_launcher

    def worker() -> None:
        torch.set_num_threads(1)
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from fewstep.plugin import build_manager
        from fewstep.trainer import Trainer

        # The fork inherits the parent's accelerate singleton (a 1-process state when an earlier test built
        # an Accelerator); drop it so that this rank joins the group set up by the launcher.
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True)
        pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable)
        pm.register(Recorder(), name="recorder")
        trainer = Trainer(config, pm, Path(run_dir), accelerator=acc)
        trainer.fit()
        assert trainer.ctx.world_size == num_processes, f"rank trained with world size {trainer.ctx.world_size}"
        torch.save(network_state(trainer.nets, networks), Path(out_dir) / f"rank{acc.process_index}.pt")

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    debug_launcher(worker, num_processes=num_processes)
    return [torch.load(Path(out_dir) / f"rank{i}.pt", weights_only=True) for i in range(num_processes)]


def network_state(nets: Any, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{"<network>.<key>": detached CPU copy} of the named networks of ``nets``."""
    return {f"{name}.{k}": v.detach().cpu().clone() for name in names for k, v in nets.get(name).state_dict().items()}


def assert_ranks_match(ranks: list[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor],
                       rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every rank holds bit-identical weights, within rounding of a 1-process ``reference`` run."""
    for rank in ranks:
        assert rank.keys() == reference.keys()
    for k, v in ranks[0].items():
        for i, other in enumerate(ranks[1:], start=1):
            assert torch.equal(v, other[k]), f"rank {i} differs from rank 0 in {k}"
        torch.testing.assert_close(v, reference[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class MethodConformance:
    """Shared contract tests for a method plugin: subclass it in a ``test_*.py`` file as ``TestX``.

    Set ``method`` (the recipe's method section). The tests run the method for a few steps on tiny
    random teachers of each backbone in ``backbones`` and check: finite per-sample losses; gradients
    only on the networks of the optimizer group that stepped and never on the teacher; identical
    results under the same seed; a resumed run giving the same next losses and weights as an
    uninterrupted one; sampler and export shapes.
    """

    method: dict[str, Any] = {}
    backbones: tuple[str, ...] = ("unet", "unet_condition", "dit")
    teacher_options: dict[str, Any] = {}
    steps: int = 4
    batch: int = 4

    @pytest.fixture(params=["unet", "unet_condition", "dit"])
    def teacher(self, request, tmp_path_factory) -> Path:
        if request.param not in self.backbones:
            pytest.skip(f"{request.param} not in {type(self).__name__}.backbones")
        folder = tmp_path_factory.mktemp(f"teacher-{request.param}")
        return make_tiny_teacher(folder, request.param, **self.teacher_options)

    def config(self, teacher: Path, **sections: dict[str, Any]) -> Any:
        return tiny_run_config(teacher, self.method, steps=self.steps, batch=self.batch, **sections)

    def test_loss_finite_and_gradients_only_where_due(self, teacher, tmp_path):
        trainer, rec = run_tiny(self.config(teacher), tmp_path / "run")
        assert rec.grads and rec.logs and all(torch.isfinite(torch.tensor(v)) for log in rec.logs for v in log.values())
        for group_name, has in rec.grads:
            group = trainer.groups[group_name]
            assert not has.pop("teacher"), "a gradient reached the teacher"
            for name, flag in has.items():
                assert flag == (name in group.modules), f"group {group_name!r}: network {name!r} grad={flag}"

    def test_determinism_under_a_seed(self, teacher, tmp_path):
        a, rec_a = run_tiny(self.config(teacher), tmp_path / "a")
        b, rec_b = run_tiny(self.config(teacher), tmp_path / "b")
        assert rec_a.logs == rec_b.logs
        for k, v in _state(a.nets.student).items():
            assert torch.equal(v, b.nets.student.state_dict()[k]), k
        c, rec_c = run_tiny(self.config(teacher, train={"seed": 1}), tmp_path / "c")
        assert rec_c.logs != rec_a.logs

    def test_resume_replays_the_same_losses(self, teacher, tmp_path):
        every = {"train": {"checkpoint_every_nimg": 2 * self.batch, "keep_checkpoints": 10}}
        full, rec_full = run_tiny(self.config(teacher, **every), tmp_path / "full")
        import shutil

        shutil.copytree(tmp_path / "full", tmp_path / "resumed")
        checkpoints = sorted((tmp_path / "resumed" / "checkpoints").glob("step-*"))
        for later in checkpoints[1:]:  # keep only the checkpoint after 2 steps
            shutil.rmtree(later)
        resumed, rec_res = run_tiny(self.config(teacher, **every), tmp_path / "resumed", resume=True)
        assert rec_res.logs == rec_full.logs[2:]
        for name in full.nets.names():
            for k, v in full.nets.get(name).state_dict().items():
                assert torch.equal(v, resumed.nets.get(name).state_dict()[k]), f"{name}.{k}"

    def test_sampler_and_export(self, teacher, tmp_path):
        trainer, _ = run_tiny(self.config(teacher), tmp_path / "run")
        images = trainer.validate()
        c, h, w = trainer.nets.teacher.data_shape
        for label, x in images.items():
            assert x.shape == (4, c, h, w), label
            assert torch.isfinite(x).all(), label
        assert (tmp_path / "run" / "samples" / "latest.png").is_file()
        assert any((tmp_path / "run" / "export").iterdir())

    #: Teacher families (tiny stock pipelines, :func:`tiny_pipeline`) that ``test_runs_on_each_family`` covers;
    #: a method that makes no sense on some family lists the others.
    families: tuple[str, ...] = TINY_FAMILIES

    @pytest.mark.slow
    @pytest.mark.parametrize("family", TINY_FAMILIES)
    def test_runs_on_each_family(self, family, tmp_path_factory, tmp_path):
        """The class's steps on a tiny stock pipeline of each family (saved with ``save_pretrained``, loaded like a
        user's checkpoint): finite losses, gradients only where due, sample shapes, an export."""
        if family not in self.families:
            pytest.skip(f"{family} not in {type(self).__name__}.families")
        folder, prompts = tiny_family_teacher(family, tmp_path_factory.getbasetemp() / "tiny-families")
        config = self.config(folder, data={"prompts": str(prompts)})
        if config.data.pairs is not None:  # a method on teacher couplings: a tiny pair store of this family's teacher
            real = getattr(config.method, "real_guidance", None)
            guidance = real if real is not None else config.teacher.guidance
            pairs = tiny_family_pairs(folder, prompts, guidance)
            config = self.config(folder, data={"prompts": str(prompts), "pairs": str(pairs)})
        trainer, rec = run_tiny(config, tmp_path / "run")
        assert rec.grads and all(torch.isfinite(torch.tensor(v)) for log in rec.logs for v in log.values())
        for group_name, has in rec.grads:
            assert not has.pop("teacher"), "a gradient reached the teacher"
            assert any(has[name] for name in trainer.groups[group_name].modules)
        for label, x in trainer.validate().items():
            assert x.shape[1:] == trainer.nets.teacher.data_shape and torch.isfinite(x).all(), label
        assert any((tmp_path / "run" / "export").iterdir())


# ------------------------------------------------------------------------------------------------
# Tiny stock pipelines, one per teacher family (fewstep.families)

TINY_IMAGE_SIZE = 32
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"


def tiny_clip_with_projection(hidden_size: int = 32, projection_dim: int = 32) -> tuple[Any, Any]:
    """A 2-layer ``CLIPTextModelWithProjection`` (SDXL's and SD3's CLIP-G role) and the tokenizer of :func:`tiny_clip`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _, tokenizer = tiny_clip(hidden_size)
    config = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden_size,
                            intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=TINY_TEXT_LENGTH, projection_dim=projection_dim,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config).eval(), tokenizer


def tiny_t5(d_model: int = 32) -> tuple[Any, Any]:
    """A 2-layer ``T5EncoderModel`` and an offline character-level ``T5Tokenizer``.

    transformers 5's ``T5Tokenizer`` is tokenizers-backed and takes its Unigram vocabulary as
    ``[(piece, log-probability), ...]`` (pad, eos, unk first, as T5's SentencePiece model): no
    SentencePiece file is needed, and it saves and reloads with ``save_pretrained`` / ``from_pretrained``.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _TINY_CHARS] + [("\u2581" + c, -3.5) for c in _TINY_CHARS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)
    return T5EncoderModel(config).eval(), tokenizer


def tiny_gemma2(hidden_size: int = 32) -> tuple[Any, Any]:
    """A 2-layer ``Gemma2Model`` (Sana's text encoder) and an offline character-level ``GemmaTokenizer``
    (a BPE over single characters with no merges, built in memory)."""
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in _TINY_CHARS:
        vocab[c] = len(vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], model_max_length=4096)
    config = Gemma2Config(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          max_position_embeddings=4096, query_pre_attn_scalar=16, sliding_window=64,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2Model(config).eval(), tokenizer


def tiny_vae_rgb(latent_channels: int = 4, shift_factor: float | None = None) -> Any:
    """Two-block RGB ``AutoencoderKL`` for :data:`TINY_IMAGE_SIZE` images (latents half the size).
    SD3 and Flux pipelines add ``shift_factor`` unconditionally, so their VAEs set one."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         sample_size=TINY_IMAGE_SIZE, scaling_factor=0.5, shift_factor=shift_factor)


def tiny_pipeline(family: str, *, guidance_embeds: bool = False, dynamic_shift: bool = False,
                  with_t5: bool = True, seed: int = 0) -> Any:
    """A stock diffusers pipeline of ``family`` (see :data:`TINY_FAMILIES`) with random tiny weights:
    32x32 RGB images, 16x16 latents, 2-layer encoders with character-level tokenizers. Nothing is downloaded.

    guidance_embeds: Flux with a guidance embedding (as Flux-dev). dynamic_shift: Flux's scheduler with
    resolution-dependent shift (as Flux-dev) instead of a static shift. with_t5: SD3 with its optional T5.
    """
    import diffusers

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    size = TINY_IMAGE_SIZE // 2
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "sd":
            text_encoder, tokenizer = tiny_clip()
            unet = diffusers.UNet2DConditionModel(
                sample_size=size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
            scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                                timestep_spacing="trailing")
            return diffusers.StableDiffusionPipeline(
                vae=tiny_vae_rgb(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if family == "sdxl":
            text_encoder, tokenizer = tiny_clip()
            text_encoder_2, tokenizer_2 = tiny_clip_with_projection()
            time_dim = 8
            unet = diffusers.UNet2DConditionModel(
                sample_size=size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * time_dim)
            scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                         beta_schedule="scaled_linear", timestep_spacing="trailing")
            return diffusers.StableDiffusionXLPipeline(
                vae=tiny_vae_rgb(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        if family == "sd3":
            text_encoder, tokenizer = tiny_clip_with_projection()
            text_encoder_2, tokenizer_2 = tiny_clip_with_projection()
            text_encoder_3, tokenizer_3 = tiny_t5(64) if with_t5 else (None, None)
            transformer = diffusers.SD3Transformer2DModel(
                sample_size=size, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                pos_embed_max_size=16)
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
            return diffusers.StableDiffusion3Pipeline(
                transformer=transformer, scheduler=scheduler, vae=tiny_vae_rgb(shift_factor=0.1),
                text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        if family == "flux":
            text_encoder, tokenizer = tiny_clip()
            text_encoder_2, tokenizer_2 = tiny_t5(32)
            transformer = diffusers.FluxTransformer2DModel(
                patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
            if dynamic_shift:  # Flux-dev's scheduler: shift from the image's token count
                scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096)
            else:  # Flux-schnell's: a static shift of 1
                scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
            return diffusers.FluxPipeline(
                scheduler=scheduler, vae=tiny_vae_rgb(shift_factor=0.1), text_encoder=text_encoder,
                tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
        if family == "pixart_sigma":
            text_encoder, tokenizer = tiny_t5(32)
            transformer = diffusers.PixArtTransformer2DModel(
                num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                cross_attention_dim=32, caption_channels=32, sample_size=size, patch_size=2, norm_num_groups=8,
                use_additional_conditions=False)
            scheduler = diffusers.DPMSolverMultistepScheduler()  # PixArt's: VP, linear betas, epsilon
            return diffusers.PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae_rgb(),
                                                 transformer=transformer, scheduler=scheduler)
        text_encoder, tokenizer = tiny_gemma2(32)
        vae = diffusers.AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock", "ResBlock"),
            decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 16),
            decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm",
            decoder_act_fns="silu", scaling_factor=0.5)
        transformer = diffusers.SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
            sample_size=size, patch_size=1, norm_elementwise_affine=False)
        # Sana's own scheduler: DPM-Solver++ over flow sigmas with shift 3 (its model_index.json)
        scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                          flow_shift=3.0)
        return diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                      transformer=transformer, scheduler=scheduler)


def make_tiny_pipeline(folder: str | Path, family: str, **options: Any) -> Path:
    """Build :func:`tiny_pipeline` and save it with ``pipe.save_pretrained(folder)``, as a user's checkpoint
    folder; returns the folder."""
    folder = Path(folder)
    tiny_pipeline(family, **options).save_pretrained(folder, safe_serialization=True)
    return folder


def write_digit_prompts(path: str | Path) -> Path:
    """A prompt list pairing each scikit-learn digits image (in ``load_digits`` order, the ``digits`` source)
    with ``"digit <label>"``: captions for text teachers trained on the embedded data. Returns ``path``."""
    from sklearn.datasets import load_digits

    path = Path(path)
    path.write_text("".join(f"digit {label}\n" for label in load_digits().target))
    return path


def tiny_family_teacher(family: str, root: str | Path) -> tuple[Path, Path]:
    """(pipeline folder, prompt list) of ``family`` under ``root``, built on first use and reused after."""
    root = Path(root)
    folder = root / family
    if not (folder / "model_index.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        partial = root / f".{family}-partial"
        make_tiny_pipeline(partial, family, **(FLUX_DEV_OPTIONS if family == "flux" else {}))
        partial.rename(folder)
    prompts = root / "prompts.txt"
    if not prompts.is_file():
        write_digit_prompts(prompts)
    return folder, prompts


def tiny_pairs(teacher: str | Path, num: int = 16, *, num_steps: int = 2, guidance: float = 1.0,
               prompts: Sequence[str] = ("a digit", "a number")) -> Path:
    """A tiny pair store (``num_steps`` Heun steps) of the teacher in folder ``teacher`` at ``guidance``, beside
    it, made once per (num, num_steps, guidance). ``prompts`` are cycled for a text teacher, unused otherwise."""
    from fewstep.pairs import MANIFEST, generate_pairs
    from fewstep.teacher import load_teacher

    teacher = Path(teacher)
    out = teacher.parent / f"{teacher.name}-pairs-{num}-{num_steps}-g{guidance:g}"
    if not (out / MANIFEST).is_file():
        loaded = load_teacher(teacher)
        generate_pairs(loaded, out, num, num_steps=num_steps, guidance=guidance,
                       prompts=list(prompts) if loaded.conditioning == "text" else None)
    return out


def tiny_family_pairs(folder: Path, prompts: Path, guidance: float = 1.0, num: int = 16) -> Path:
    """:func:`tiny_pairs` of a family teacher, captioned with the first ``num`` lines of the ``prompts`` file."""
    return tiny_pairs(folder, num, guidance=guidance, prompts=prompts.read_text().splitlines()[:num])


#: Options of :func:`tiny_pipeline` that make the tiny Flux a guidance-distilled teacher with dynamic shift
#: (as Flux-dev), the harder of the two Flux variants.
FLUX_DEV_OPTIONS = {"guidance_embeds": True, "dynamic_shift": True}
