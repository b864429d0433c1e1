"""Noise-image couplings from the teacher, stored on disk and reused.

DMD's regression loss (distribution.md §1.4), CAF's deterministic couplings (consistency.md §8.1) and
reflow (distribution.md §8.2) all train on pairs (z, x0 = ODE_teacher(z)). ``fewstep pairs TEACHER OUT``
integrates the teacher's PF-ODE with its deterministic sampler from seeded noise and writes:

- ``OUT/manifest.json``: how the pairs were made (teacher folder and process, sampler, steps, guidance,
  seed, shard size, count, shapes, conditioning; the prompt list for a text teacher);
- ``OUT/shard-00000.safetensors``, ...: ``noise`` (n, C, H, W) and ``x0`` (n, C, H, W), float32 in model
  space (latents for a latent teacher), ``labels`` (n,) for a class-conditional teacher, ``prompt_ids``
  (n,) indices into the manifest's prompts for a text teacher.

Shard k's noise and conditions come from a generator seeded by (seed, k), so a store is reproducible
and a larger store with the same seed and shard size extends a smaller one. Shards are written
atomically one at a time; re-running the command resumes after the last complete shard, so an
interrupted generation loses at most one shard.

A recipe uses a store with ``data.pairs: OUT``; every batch then carries ``Batch.pairs`` (noise, x0)
and ``Batch.pair_cond``, drawn in their own seeded order (:class:`fewstep.data.IndexStream`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.types import Cond

__all__ = ["MANIFEST", "PairStore", "generate_pairs"]

MANIFEST = "manifest.json"
_FORMAT = 1


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def _settings(teacher: Any, *, num_steps: int, solver: str, guidance: float, seed: int, shard_size: int,
              prompts: Sequence[str] | None) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "teacher": str(teacher.source),
        "autoguidance": teacher.autoguided,
        "process": teacher.process.describe(),
        "sampler": solver,
        "num_steps": num_steps,
        "guidance": guidance,
        "seed": seed,
        "shard_size": shard_size,
        "sample_shape": list(teacher.sample_shape),
        "conditioning": teacher.conditioning,
        "num_classes": teacher.num_classes,
        "prompts": list(prompts) if prompts is not None else None,
    }


@torch.no_grad()
def generate_pairs(
    teacher: Any,
    out_dir: str | Path,
    num: int,
    *,
    num_steps: int = 32,
    solver: str = "heun",
    guidance: float = 1.0,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    shard_size: int = 4096,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``num`` teacher couplings into ``out_dir`` (see the module docstring); returns the folder.

    teacher: a loaded :class:`fewstep.teacher.Teacher` (its device and dtype are used).
    num_steps / solver: the teacher's deterministic ODE sampler (``Teacher.sample``; Heun: 2 NFE per step).
    guidance: the scale of every teacher prediction (CFG, or autoguidance for an autoguided teacher).
    prompts: the prompt list of a text-conditional teacher (shard k draws prompts uniformly with its seed).
    Labels of a class-conditional teacher are uniform over its classes. An existing store in
    ``out_dir`` made with other settings is refused rather than mixed.
    """
    from safetensors.torch import save_file

    if num < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"generate_pairs: num, shard_size and batch_size must be >= 1, got {num}, {shard_size}, "
                         f"{batch_size}")
    if teacher.conditioning == "text" and not prompts:
        raise ValueError("generate_pairs: the teacher is text-conditional; give a prompt list (--prompts FILE)")
    out = Path(out_dir)
    settings = _settings(teacher, num_steps=num_steps, solver=solver, guidance=guidance, seed=seed,
                         shard_size=shard_size, prompts=prompts if teacher.conditioning == "text" else None)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        differs = sorted(k for k in settings if previous.get(k) != settings[k])
        if differs:
            raise ValueError(f"{out} already holds pairs made with other settings ({', '.join(differs)}); "
                             "choose another folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, {**settings, "num": 0})
    shards = math.ceil(num / shard_size)
    done = 0
    for k in range(shards):
        n = min(shard_size, num - k * shard_size)
        path = _shard_path(out, k)
        if path.is_file() and _shard_len(path) == n:
            done += n
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        noise = torch.randn((n, *teacher.sample_shape), generator=g)
        extra: dict[str, Tensor] = {}
        labels = prompt_ids = None
        if teacher.conditioning == "class":
            labels = extra["labels"] = torch.randint(0, teacher.num_classes, (n,), generator=g)
        elif teacher.conditioning == "text":
            prompt_ids = extra["prompt_ids"] = torch.randint(0, len(prompts), (n,), generator=g)
        x0 = []
        for lo in range(0, n, batch_size):
            rows = slice(lo, lo + batch_size)
            cond = None
            if labels is not None:
                cond = Cond(labels=labels[rows].to(teacher.device))
            elif prompt_ids is not None:
                cond = teacher.encode_prompts([prompts[i] for i in prompt_ids[rows].tolist()])
            z = noise[rows].to(teacher.device)
            x0.append(teacher.sample(z, cond, num_steps=num_steps, solver=solver, guidance=guidance,
                                     decode=False).float().cpu())
            if progress is not None:
                progress(done + min(lo + batch_size, n), num)
        tmp = path.with_suffix(".tmp")
        save_file({"noise": noise.contiguous(), "x0": torch.cat(x0).contiguous(), **extra}, str(tmp))
        tmp.replace(path)
        done += n
        _write_json(manifest_path, {**settings, "num": done})
    return out


def _shard_len(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("noise").get_shape()[0]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class PairStore:
    """A pair store written by :func:`generate_pairs`, held in memory.

    noise, x0: (N, C, H, W) float32 in model space; labels: (N,) int64 or None; prompts: the prompt of
    each pair or None. ``manifest`` is the store's manifest.
    """

    def __init__(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"data.pairs: {self.folder} is not a pair store ({MANIFEST} is missing); "
                                    "make one with `fewstep pairs TEACHER OUT --num N`")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        num, size = int(self.manifest["num"]), int(self.manifest["shard_size"])
        if num < 1:
            raise ValueError(f"data.pairs: {self.folder} holds no complete shard yet (generation still running "
                             "or interrupted: re-run `fewstep pairs` with the same arguments to resume)")
        parts = [load_file(str(_shard_path(self.folder, k))) for k in range(math.ceil(num / size))]
        self.noise = torch.cat([p["noise"] for p in parts])[:num]
        self.x0 = torch.cat([p["x0"] for p in parts])[:num]
        self.labels = torch.cat([p["labels"] for p in parts])[:num] if "labels" in parts[0] else None
        self.prompts: tuple[str, ...] | None = None
        if "prompt_ids" in parts[0]:
            table = self.manifest["prompts"]
            ids = torch.cat([p["prompt_ids"] for p in parts])[:num]
            self.prompts = tuple(table[i] for i in ids.tolist())

    def __len__(self) -> int:
        return self.noise.shape[0]

    def check(self, teacher: Any) -> None:
        """Refuse a store whose pairs a run's teacher could not have made: other shape or conditioning."""
        m = self.manifest
        if tuple(m["sample_shape"]) != tuple(teacher.sample_shape) or m["conditioning"] != teacher.conditioning:
            raise ValueError(f"data.pairs: {self.folder} holds {m['conditioning']}-conditional pairs of shape "
                             f"{tuple(m['sample_shape'])} (from {m['teacher']}), but this run's teacher is "
                             f"{teacher.conditioning}-conditional with samples {tuple(teacher.sample_shape)}; "
                             "generate pairs with this teacher: `fewstep pairs TEACHER OUT`")
        if m["conditioning"] == "class" and m["num_classes"] != teacher.num_classes:
            raise ValueError(f"data.pairs: {self.folder} has {m['num_classes']} classes, the teacher "
                             f"{teacher.num_classes}")

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None, tuple[str, ...] | None]:
        """(noise, x0, labels or None, prompts or None) of the pairs ``idx`` (B,)."""
        labels = self.labels[idx] if self.labels is not None else None
        prompts = tuple(self.prompts[i] for i in idx.tolist()) if self.prompts is not None else None
        return self.noise[idx], self.x0[idx], labels, prompts

    def describe(self) -> str:
        m = self.manifest
        return (f"{len(self)} pairs from {m['teacher']} ({m['sampler']} {m['num_steps']} steps, guidance "
                f"{m['guidance']:g}{', autoguided' if m['autoguidance'] else ''})")
