"""Test helpers shipped with fewstep, for its own tests and for plugin authors.

Tiny diffusers models (each builds in well under 0.5 s on one CPU thread) and
:func:`make_tiny_teacher`, which writes a complete teacher folder that :func:`fewstep.teacher.load_teacher`
reads. Everything is built in-process: no file is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = ["make_tiny_teacher", "tiny_clip", "tiny_dit", "tiny_unet", "tiny_unet_condition", "tiny_vae"]

TINY_NUM_CLASSES = 10
TINY_TEXT_LENGTH = 16


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
) -> Path:
    """Write a random tiny teacher folder and return it.

    backbone: "unet" (unconditional, or class-conditional with ``conditioning="class"``),
        "unet_condition" (text-conditional, with :func:`tiny_clip`) or "dit" (class-conditional).
    process: "vp" | "edm" | "flow" with their default settings; prediction_type: passed to VP / EDM
        when given (flow always predicts velocity).
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
            **({} if prediction_type is None else {"prediction_type": prediction_type})
        )
    net = Backbone(model, num_classes=num_classes)
    return save_teacher(Path(folder), net, noise, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
