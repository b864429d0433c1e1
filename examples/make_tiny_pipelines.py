"""Write one tiny stock diffusers pipeline per teacher family, for the recipes in recipes/families/.

Each folder is a stock pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline,
FluxPipeline, PixArtSigmaPipeline, SanaPipeline) with random tiny weights (32x32 RGB images, 16x16 latents,
2-layer text encoders with character-level tokenizers), saved with ``pipe.save_pretrained(folder)``: fewstep
loads it exactly like a user's checkpoint, and ``DiffusionPipeline.from_pretrained(folder)`` generates from it.
Nothing is downloaded. The Flux folder is guidance-distilled with dynamic shift (as Flux-dev). A prompt list
``prompts.txt`` (``digit <label>`` for each scikit-learn digits image) captions the embedded digits data.

    python examples/make_tiny_pipelines.py recipes/families/tiny      # all families (a few seconds)
    python examples/make_tiny_pipelines.py OUT --family sdxl flux     # some of them
    fewstep distill recipes/families/sdxl.yaml

The weights are random: a run checks the plumbing (encoders, conditioning, latents, noise process, export),
not image quality.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fewstep.testing import FLUX_DEV_OPTIONS, TINY_FAMILIES, make_tiny_pipeline, write_digit_prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder that receives one pipeline folder per family and prompts.txt")
    parser.add_argument("--family", nargs="+", choices=TINY_FAMILIES, default=list(TINY_FAMILIES),
                        help="families to write (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for family in args.family:
        folder = args.out / family
        if folder.exists():
            shutil.rmtree(folder)
        make_tiny_pipeline(folder, family, seed=args.seed, **(FLUX_DEV_OPTIONS if family == "flux" else {}))
        print(f"{folder}: tiny {family} pipeline")
    print(f"{write_digit_prompts(args.out / 'prompts.txt')}: captions of the digits data")


if __name__ == "__main__":
    main()
