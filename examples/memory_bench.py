"""Peak training memory per method: full fine-tuning vs LoRA vs LoRA + gradient checkpointing (docs/MEMORY.md).

The teacher is a Stable Diffusion 1.5-architecture UNet2DConditionModel built from SD 1.5's UNet config (its
blocks, depths, attention layout, cross-attention width 768 and scaled-linear DDPM schedule) with random
weights, its channel widths scaled by ``--width`` (1.0 is SD 1.5 itself, 860 M parameters: full DMD2 then
holds about ten copies, ~30 GB, more than a 23 GB CPU machine has), a 2-layer CLIP text encoder of width
768 and a tiny VAE, on 16x16 latents (32x32 images, 1 channel) at batch ``--batch``. Each (method, mode)
trains ``--steps`` steps in its own process (one CPU thread) and reports the peak resident memory of that
process up to the end of training (``Trainer._peak_mb``: before the final sampling and evaluation) and its
resident memory after the imports, before any network is built. Nothing is downloaded.

    OMP_NUM_THREADS=1 python examples/memory_bench.py --out docs/MEMORY.md

``--family sdxl`` builds an SDXL base-architecture UNet instead (its three levels, transformer depths 1/2/10,
64-wide heads, cross-attention width 2048 from two CLIP encoders of widths 768 and 1280, text-time conditioning)
with ``--latent`` x ``--latent`` latents, for the GPU check of issue 12 (examples/gpu_checks.sh): on a GPU the
figures are ``torch.cuda.max_memory_allocated`` (setup: up to the start of training; train: from there on).

    python examples/memory_bench.py --family sdxl --width 1 --latent 128 --batch 1 --precision bf16 \\
        --methods dmd2 --modes lora lora+gc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS: dict[str, dict] = {
    "cd": {"name": "cd", "num_scales": 8},
    "sct": {"name": "sct", "stage_nimg": 8},
    "scm": {"name": "scm", "mode": "scd"},
    "ctm": {"name": "ctm", "gan_start_nimg": 2},
    "flowmap": {"name": "flowmap"},
    "dmd2": {"name": "dmd2"},
    "msd": {"name": "msd", "num_students": 2, "adm_nimg": 2},
}
# Methods whose later phase (CTM's GAN, MSD's DM) starts after the first step: one more step.
LATER_PHASE = {"ctm", "msd"}
MODES = {"full": ({}, False), "lora": ({"rank": 16}, False), "lora+gc": ({"rank": 16}, True)}


def sd15_unet(width: float):
    """SD 1.5's UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), channels scaled by ``width``."""
    from diffusers import UNet2DConditionModel

    channels = tuple(int(round(c * width / 32)) * 32 for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def sdxl_unet(width: float, latent: int):
    """SDXL base 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, checked against
    copies of it in public code: levels 320/640/1280 with 5/10/20 heads of width 64, transformer depths 1/2/10, linear
    projections, cross-attention width 2048, text-time embedding 256 + pooled 1280; 2567 M parameters at width 1),
    heads scaled by ``width``."""
    from diffusers import UNet2DConditionModel

    heads = tuple(max(1, round(h * width)) for h in (5, 10, 20))
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(64 * h for h in heads), attention_head_dim=heads,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def make_sdxl_teacher(folder: Path, width: float, latent: int) -> None:
    """An SDXL pipeline folder: :func:`sdxl_unet`, 2-layer CLIP encoders of SDXL's widths, the tiny RGB VAE (latents
    half the image size) and SDXL's scaled-linear Euler scheduler; plus ``params.json`` and ``prompts.txt``."""
    import diffusers
    import torch

    from fewstep.testing import tiny_clip, tiny_clip_with_projection, tiny_vae_rgb, write_digit_prompts

    torch.manual_seed(0)
    unet = sdxl_unet(width, latent)
    text_encoder, tokenizer = tiny_clip(hidden_size=768)
    text_encoder_2, tokenizer_2 = tiny_clip_with_projection(hidden_size=1280, projection_dim=1280)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="trailing")
    diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae_rgb(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    (folder / "params.json").write_text(json.dumps(sum(p.numel() for p in unet.parameters())))
    write_digit_prompts(folder / "prompts.txt")


def make_teacher(folder: Path, width: float) -> None:
    """Write the teacher folder and ``folder/params.json`` (the UNet's parameter count)."""
    import torch

    from fewstep.backbones import Backbone
    from fewstep.diffusion import VPProcess
    from fewstep.teacher import save_teacher
    from fewstep.testing import tiny_clip, tiny_vae

    torch.manual_seed(0)
    unet = sd15_unet(width)
    text_encoder, tokenizer = tiny_clip(hidden_size=768)
    vae = tiny_vae(channels=1, latent_channels=4, sample_size=32)
    # SD 1.5's scheduler: scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon prediction.
    process = VPProcess(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    save_teacher(folder, Backbone(unet), process, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    (folder / "params.json").write_text(json.dumps(sum(p.numel() for p in unet.parameters())))


def rss_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class SetupPeak:
    """Observer plugin: at the start of training, records the peak memory of the setup (loading the teacher,
    building and adapting the networks) and resets the high-water mark, so that the trainer's peak
    (``Trainer._peak_mb`` when training ends) covers training only. CPU: resident memory (Linux ``clear_refs`` 5
    resets the getrusage peak); GPU: ``torch.cuda`` allocated memory and its peak statistics."""

    def __init__(self) -> None:
        self.setup_mb = self.start_mb = 0.0

    def fewstep_on_train_start(self, ctx) -> None:
        if ctx.device.type == "cuda":
            import torch

            self.setup_mb = torch.cuda.max_memory_allocated(ctx.device) / 2**20
            self.start_mb = torch.cuda.memory_allocated(ctx.device) / 2**20
            torch.cuda.reset_peak_memory_stats(ctx.device)
            return
        self.setup_mb, self.start_mb = rss_mb("VmHWM"), rss_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")


def run_one(teacher: str, method: str, mode: str, steps: int, batch: int, precision: str, out: str) -> None:
    """One training run in this process; writes its memory figures as JSON to ``out``."""
    import torch

    torch.set_num_threads(1)
    from fewstep.hookspecs import hookimpl
    from fewstep.plugin import build_manager
    from fewstep.testing import tiny_run_config
    from fewstep.trainer import Trainer

    baseline = rss_mb("VmHWM")
    lora, checkpointing = MODES[mode]
    sections = {"train": {"gradient_checkpointing": checkpointing, "mixed_precision": precision},
                "export": {"enabled": False}, "validation": {"steps": [1], "num_images": 1, "teacher_steps": None}}
    if (Path(teacher) / "prompts.txt").is_file():  # the SDXL teacher's captions for the digits images
        sections["data"] = {"prompts": str(Path(teacher) / "prompts.txt")}
    if lora:
        sections["lora"] = lora
    if method == "msd":
        sections["plugins"] = {"disable": ["ema"]}
    cfg = tiny_run_config(teacher, METHODS[method], steps=steps, batch=batch, **sections)
    t0 = time.perf_counter()
    probe = SetupPeak()
    hookimpl(SetupPeak.fewstep_on_train_start)  # marked here: the driver process never imports fewstep
    pm = build_manager(cfg.method.name, extra=cfg.plugins.extra, disabled=cfg.plugins.disable)
    pm.register(probe, name="setup-peak")
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(cfg, pm, Path(run) / "run")
        trainer.fit()
    train_mb = max(trainer._peak_mb, probe.start_mb)
    Path(out).write_text(json.dumps({"method": method, "mode": mode, "device": trainer.ctx.device.type,
                                     "baseline_mb": round(baseline, 1),
                                     "setup_mb": round(probe.setup_mb, 1), "train_mb": round(train_mb, 1),
                                     "peak_mb": round(max(probe.setup_mb, train_mb), 1),
                                     "seconds": round(time.perf_counter() - t0, 1)}))


def table(rows: list[dict], params: int, args: argparse.Namespace) -> str:
    by = {(r["method"], r["mode"]): r for r in rows}
    gpu = any(r["device"] == "cuda" for r in rows)
    arch, latent = ("SDXL", args.latent) if args.family == "sdxl" else ("SD 1.5", 16)
    lines = [f"{arch}-architecture UNet at width {args.width} ({params / 1e6:.0f} M parameters, "
             f"{'fp32' if args.precision == 'no' else args.precision}), {latent}x{latent} latents, batch {args.batch}, "
             f"{args.steps} training step(s) (CTM and MSD one more), "
             + ("GPU memory allocated in MB" if gpu else "one CPU thread. Resident memory in MB")
             + ": setup = peak while loading the teacher and building the networks, train = peak while "
             f"training; the process holds {sum(r['baseline_mb'] for r in rows) / max(len(rows), 1):.0f} MB after its "
             "imports. LoRA: rank 16 on the default targets; "
             "GC: gradient checkpointing.", "",
             "| method | full setup | full train | LoRA setup | LoRA train | LoRA+GC train | LoRA / full (peak) "
             "| LoRA+GC / full (peak) | LoRA / full (train) |", "|---|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        full, lora, gc = (by.get((method, m)) for m in MODES)
        cells = [f"{full['setup_mb']:.0f}" if full else "-", f"{full['train_mb']:.0f}" if full else "-",
                 f"{lora['setup_mb']:.0f}" if lora else "-", f"{lora['train_mb']:.0f}" if lora else "-",
                 f"{gc['train_mb']:.0f}" if gc else "-"]
        cells += [f"{r['peak_mb'] / full['peak_mb']:.0%}" if full and r else "-" for r in (lora, gc)]
        cells.append(f"{lora['train_mb'] / full['train_mb']:.0%}" if full and lora else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.3, help="channel-width factor of SD 1.5's UNet (0.3: "
                        "block widths 96/192/384/384, 81 M parameters); SDXL: of its head counts (1: SDXL base)")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15", help="the UNet architecture")
    parser.add_argument("--latent", type=int, default=128, help="latent size of the SDXL teacher (SD 1.5: 16)")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no",
                        help="train.mixed_precision (no: fp32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="training steps (CTM, MSD: one more, for their later phase); "
                        "the optimizer states exist from the first step")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES),
                        help="configurations to run (e.g. only full at a width where it is the long one)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here (else print it)")
    parser.add_argument("--one", nargs=4, metavar=("TEACHER", "METHOD", "MODE", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        teacher, method, mode, out = args.one
        run_one(teacher, method, mode, args.steps + (method in LATER_PHASE), args.batch, args.precision, out)
        return
    if args.teacher:
        if args.family == "sdxl":
            make_sdxl_teacher(args.teacher, args.width, args.latent)
        else:
            make_teacher(args.teacher, args.width)
        return
    # This driver imports nothing heavy and builds nothing: a child's peak RSS starts from its parent's
    # (Linux carries the RSS high-water mark of the forking process across exec).
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-membench-"))
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        teacher = tmp / "teacher"
        subprocess.run([sys.executable, __file__, "--width", str(args.width), "--family", args.family, "--latent",
                        str(args.latent), "--teacher", str(teacher)], env=env, check=True, capture_output=True)
        params = json.loads((teacher / "params.json").read_text())
        rows = []
        for method in args.methods:
            for mode in args.modes:
                out = tmp / f"{method}-{mode}.json"
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
                       "--precision", args.precision, "--one", str(teacher), method, mode, str(out)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode or not out.is_file():
                    print(f"{method} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(out.read_text()))
                print(json.dumps(rows[-1]), flush=True)
        text = table(rows, params, args)
        if args.out:
            args.out.write_text(text)
        print(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
