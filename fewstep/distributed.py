"""What the accelerate launcher asks for, against the recipe (docs/DISTRIBUTED.md).

``accelerate launch`` passes its config file to the processes as environment variables
(``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_DEEPSPEED_CONFIG_FILE``...). The recipe's ``train.mixed_precision`` decides the compute dtype
(it is part of what a resumed run must replay); a launcher that asks for a different reduced precision is
refused, never silently overridden. A launcher "no" cannot be told apart from a launch without any config
(accelerate writes "no" by default), so it defers to the recipe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path


class LaunchConflict(ValueError):
    """The accelerate launcher's settings contradict the recipe."""


def launcher_precisions(env: Mapping[str, str]) -> dict[str, str]:
    """Reduced precisions the launch asks for, by where they come from: {"accelerate config": "bf16",
    "DeepSpeed config <file>": "fp16"}; absent entries ask for nothing."""
    found: dict[str, str] = {}
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("", "no"):
        found["the accelerate config (ACCELERATE_MIXED_PRECISION)"] = mp
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and ds_file and Path(ds_file).is_file():
        ds = json.loads(Path(ds_file).read_text())
        for key in ("bf16", "fp16"):
            if ds.get(key, {}).get("enabled") is True:  # "auto" follows accelerate's choice, hence the recipe
                found[f"the DeepSpeed config {ds_file} ({key}.enabled)"] = key
    return found


def check_mixed_precision(recipe: str, env: Mapping[str, str] | None = None) -> None:
    """Refuse a launch whose accelerate or DeepSpeed config asks for another reduced precision than the recipe's
    ``train.mixed_precision`` ("no", "bf16" or "fp16")."""
    env = os.environ if env is None else env
    for source, value in launcher_precisions(env).items():
        if value != recipe:
            raise LaunchConflict(
                f"train.mixed_precision is {recipe!r} in the recipe but {source} asks for {value!r}; fewstep never "
                f"overrides one with the other. Fix: set train.mixed_precision: {value} in the recipe (--set "
                f"train.mixed_precision={value}), or launch with --mixed_precision {recipe} / change the config file")


def engine(env: Mapping[str, str] | None = None) -> str:
    """The launcher's distributed engine: "deepspeed", "fsdp2", "fsdp" (version 1), or "ddp" (also one process)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2" if env.get("FSDP_VERSION", "1") == "2" else "fsdp"
    return "ddp"


def zero_stage(env: Mapping[str, str]) -> int | None:
    """DeepSpeed's ZeRO stage from the launcher (``--zero_stage`` or the DeepSpeed config file), None if unset."""
    if (stage := env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")) not in (None, "", "None"):
        return int(stage)
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and Path(ds_file).is_file():
        stage = json.loads(Path(ds_file).read_text()).get("zero_optimization", {}).get("stage")
        return int(stage) if isinstance(stage, int) else None
    return None


def check_engine(env: Mapping[str, str] | None = None) -> None:
    """Refuse engines that keep the trainable networks' parameters sharded between steps (FSDP 1 and 2, ZeRO-3):
    the evaluation EMA and target updates, the per-network checkpoints and the export read whole parameters.
    DDP and DeepSpeed ZeRO-1/2 (optimizer states and gradients sharded, parameters whole) are accepted."""
    env = os.environ if env is None else env
    kind = engine(env)
    if kind in ("fsdp", "fsdp2") or (kind == "deepspeed" and zero_stage(env) == 3):
        name = "DeepSpeed ZeRO-3" if kind == "deepspeed" else kind.upper()
        raise LaunchConflict(
            f"{name} keeps the student's parameters sharded across processes, and fewstep's EMA and target "
            "updates, checkpoints and export read them whole (docs/DISTRIBUTED.md); not supported in this "
            "version. Fix: launch with DDP (accelerate launch --multi_gpu) or DeepSpeed ZeRO-2 (--use_deepspeed "
            "--zero_stage 2), which shard optimizer states and gradients; LoRA (a lora: section) cuts the "
            "trainable state further")


def sharding_plan(trainable: Iterable[str], networks: Iterable[str]) -> dict[str, str]:
    """Per network: "prepared" (in an optimizer group: accelerate wraps it, so DDP replicates it with synced
    gradients, FSDP and DeepSpeed ZeRO-3 shard it) or "replicated" (frozen: the teacher, the EMA, targets; a
    full copy on every process, never given to accelerate)."""
    trainable = set(trainable)
    return {name: "prepared" if name in trainable else "replicated" for name in ["teacher", *networks]}
