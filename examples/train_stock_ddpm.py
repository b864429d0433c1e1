"""Train a DDPM teacher the way a diffusers user makes one: only torch and stock diffusers, no fewstep.

The checkpoint it writes is the "foreign teacher" of issue 14: a ``DDPMPipeline`` folder with an
epsilon-prediction UNet2DModel and a ``DDPMScheduler`` with linear betas (1e-4..0.02, 1000 steps; DDPM's
schedule) and ``clip_sample: true`` (diffusers' default), as the original DDPM releases on the Hub are. At
t = 999 such a teacher's x0 = (x_t - sqrt(1 - alphabar) eps) / sqrt(alphabar) multiplies the network's error by
~156, which is what fewstep's student conditioning (docs/CONDITIONING.md) must cope with.

Data: Fashion-MNIST's 60 000 training images (the idx file of ``apt-get install dataset-fashion-mnist``), scaled
to [-1, 1] and resized to 16x16 (bilinear, antialiased: the resize fewstep's data pipeline uses, so FIDs against
fewstep's reference statistics are comparable). Unconditional. Training: DDPM Alg. 1 (uniform integer
timesteps, MSE on eps), AdamW, EMA of the weights (diffusers' EMAModel); the EMA weights are saved.

Architecture: UNet2DModel (32, 64, 64), one layer per block, attention at the lowest resolution: the size of
the project's own Fashion teacher (recipes/fashion/teacher.yaml), 1.1 M parameters.

Cost (estimated from docs/BENCHMARKS.md's teacher: ~170 images/s on 1 CPU thread for this UNet at 16x16):
600k images (the default) is about 1 hour on 1 CPU thread. Not run as part of the test suite; its smoke test
trains two steps on a tiny idx file.

    python examples/train_stock_ddpm.py --out teachers/fashion-ddpm-eps
    python -c "from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('teachers/fashion-ddpm-eps')"
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def read_idx_images(path: str | Path) -> torch.Tensor:
    """An idx3 image file (optionally gzipped) -> (N, 1, H, W) float32 in [-1, 1]."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    magic, n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051:
        raise ValueError(f"{path} is not an idx3 image file (magic {magic}, expected 2051)")
    pixels = np.frombuffer(raw, dtype=np.uint8, count=n * h * w, offset=16).reshape(n, 1, h, w)
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0)


def load_images(path: str | Path, resolution: int) -> torch.Tensor:
    """(N, 1, R, R) in [-1, 1]: bilinear, antialiased resize."""
    x = read_idx_images(path)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1.0, 1.0)


def build_unet(resolution: int) -> UNet2DModel:
    return UNet2DModel(
        sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=FASHION, help="idx3 image file (gzipped or not); default: Fashion-MNIST train")
    p.add_argument("--out", required=True, help="output DDPMPipeline folder")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--nimg", type=int, default=600_000, help="training length in images (default 600k, as the "
                   "project's Fashion teacher)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate (the project's Fashion teacher's)")
    p.add_argument("--warmup", type=int, default=10_000, help="linear lr warm-up in images")
    p.add_argument("--ema-decay", type=float, default=0.9995, help="EMA decay per step (half-life ~1400 steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable saves (OUT/train_state.pt "
                   "plus the EMA pipeline in OUT); a re-run with the same --out resumes from the last one, "
                   "or continues a finished run when --nimg is larger")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    images = load_images(args.data, args.resolution)
    unet = build_unet(args.resolution)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              prediction_type="epsilon", clip_sample=True)
    # diffusers' default warm-up (decay min(ema_decay, (1 + step) / (10 + step))): a constant decay from step 0
    # (min_decay = ema_decay) keeps ema_decay^steps of the random initialisation in the EMA: 10 % after 600k
    # images at 0.9995, which washed the samples out (pixel std 0.19 against the data's 0.32; FID 280).
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, foreach=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    steps = math.ceil(args.nimg / args.batch)
    g = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    state_path = out / "train_state.pt"
    first = 0
    if state_path.exists():  # resume: weights, EMA, optimiser, data/noise generator and step
        state = torch.load(state_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        first = state["step"]
        print(f"resumed from {state_path} at step {first}/{steps}", flush=True)

    def save(step: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "generator": g.get_state(), "step": step}, tmp)
        tmp.replace(state_path)
        ema_unet = build_unet(args.resolution)
        ema.copy_to(ema_unet.parameters())
        DDPMPipeline(unet=ema_unet.eval(), scheduler=scheduler).save_pretrained(out)

    start = time.time()
    unet.train()
    for step in range(first, steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) * args.batch / max(args.warmup, 1))
        x0 = images[torch.randint(0, len(images), (args.batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)  # DDPM Alg. 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            rate = (step + 1 - first) * args.batch / (time.time() - start)
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {rate:.0f} img/s", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            save(step + 1)
    save(steps)  # kept: a re-run with a larger --nimg continues this run
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
