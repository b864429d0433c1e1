"""Build a tiny offline Stable-Diffusion-style text-to-image teacher and a caption data set for it.

    python examples/make_tiny_text_teacher.py [--out runs/tiny-text] [--num 512] [--seed 0]

Writes OUT/teacher/, a stock ``StableDiffusionPipeline`` folder (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel with a character-level CLIPTokenizer, DDPMScheduler; random weights, about 2 MB) that
``DiffusionPipeline.from_pretrained`` and fewstep's ``teacher.pretrained`` both load without a network,
and OUT/data/, NUM coloured shapes in the ``imagefolder`` convention: PNG files plus ``metadata.jsonl``
with ``file_name``, ``text`` ("a red circle") and ``negative_prompt``. A third of the images are 40x32 or
32x40 rather than 32x32, so resizing, cropping and aspect-ratio buckets have something to do.

recipes/text/cd.yaml distils this teacher on this data. The weights are random: the pair exercises the
whole text-to-image data path (captions, negative prompts, caption dropout, the latent/text cache), not
image quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((32, 32), (32, 32), (40, 32), (32, 32), (32, 32), (32, 40))  # (width, height)


def make_data(out: Path, num: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        w, h = SIZES[i % len(SIZES)]
        image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(90, 160, 3)))
        draw = ImageDraw.Draw(image)
        r = int(rng.integers(7, 12))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        name = f"{i:05d}.png"
        image.save(out / name)
        rows.append({"file_name": name, "text": f"a {colour} {shape}", "negative_prompt": "a grey blur"})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_teacher(out: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # character-level: any lower-case prompt gets distinct ids, no merges file needed
        for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'":
            vocab[ch + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # SD's scheduler: scaled-linear betas, epsilon prediction; "trailing" spacing for few-step baselines.
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-text"), help="output folder")
    parser.add_argument("--num", type=int, default=512, help="images in the caption data set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the teacher's weights")
    args = parser.parse_args()
    make_data(args.out / "data", args.num, args.seed)
    make_teacher(args.out / "teacher", args.seed)
    print(f"wrote {args.out / 'teacher'} (StableDiffusionPipeline) and {args.num} captioned images in "
          f"{args.out / 'data'}")


if __name__ == "__main__":
    main()
