"""A random-weight DiT-B/2-size teacher and a random class-labelled image set, for speed checks only
(examples/gpu_checks.sh): 12 blocks, hidden size 768 (12 heads of 64), patch 2, 1000 classes, on 32x32 inputs,
the token count of a 256x256 image's SD-VAE latents (32x32x4: 256 tokens). The inputs have 3 channels instead of
the latents' 4 because fewstep's .npz sources hold 1- or 3-channel images; only the patch embedding sees the
channel count (under 0.1 % of the FLOPs). Nothing here is trained or meaningful as images.

    python examples/make_dit_b2_teacher.py OUT_DIR [--layers 12 --heads 12 --num 2048]
writes OUT_DIR/teacher/ (a fewstep teacher folder: DiT + VP scheduler) and OUT_DIR/data.npz.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=12, help="DiT blocks (DiT-B: 12)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads of 64 channels (DiT-B: 12)")
    parser.add_argument("--size", type=int, default=32, help="input size (32: a 256x256 image's latents)")
    parser.add_argument("--num", type=int, default=2048, help="random images in data.npz")
    args = parser.parse_args()
    from diffusers import DiTTransformer2DModel

    from fewstep.backbones import Backbone
    from fewstep.diffusion import VPProcess
    from fewstep.teacher import save_teacher

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=args.heads, attention_head_dim=64, in_channels=3, out_channels=3,
                                  num_layers=args.layers, sample_size=args.size, patch_size=2, num_embeds_ada_norm=1000)
    save_teacher(args.out / "teacher", Backbone(model, num_classes=1000), VPProcess())
    rng = np.random.default_rng(0)
    np.savez(args.out / "data.npz", x=rng.integers(0, 256, (args.num, args.size, args.size, 3), dtype=np.uint8),
             y=rng.integers(0, 1000, args.num))
    print(f"wrote {args.out / 'teacher'} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
          f"and {args.out / 'data.npz'}")


if __name__ == "__main__":
    main()
