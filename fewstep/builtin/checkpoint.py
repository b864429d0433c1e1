"""Checkpoints: every network as safetensors plus accelerate's state (optimizers, grad scaler, RNG).

Layout: ``RUN/checkpoints/step-XXXXXXXX/{nets/<name>.safetensors, accelerate/, trainer_state.json}``.
A checkpoint is written into a hidden temporary folder and renamed into place only when complete, so
an interrupted write never leaves a checkpoint that ``--resume`` would pick up. The teacher is never
saved (it is a frozen input). accelerate's own model saving is switched off: fewstep writes every
network itself, trainable or not (targets, EMA), in one format.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from fewstep.hookspecs import hookimpl
from fewstep.nn import unwrap
from fewstep.types import Nets, RunContext

_PREFIX = "step-"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{_PREFIX}*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def _skip_accelerate_models(accelerator: Any) -> None:
    if getattr(accelerator, "_fewstep_hooks", False):
        return
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    accelerator._fewstep_hooks = True


@hookimpl
def fewstep_save_checkpoint(ctx: RunContext, accelerator: Any, nets: Nets, state: dict[str, Any]) -> Path:
    _skip_accelerate_models(accelerator)
    root = ctx.run_dir / "checkpoints"
    final = root / f"{_PREFIX}{state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "nets").mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    if ctx.is_main:
        for name in nets.names():
            save_model(unwrap(nets.get(name)), str(tmp / "nets" / f"{name}.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(ctx.run_dir)[: -ctx.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint of ``run_dir`` named ``which``: a folder name (``step-00000100``), a step count, or
    the images seen when it was written (the unit of every interval in a recipe)."""
    found = checkpoint_dirs(run_dir)
    for path in found:
        state = json.loads((path / "trainer_state.json").read_text())
        if which in (path.name, str(state["step"]), str(state["nimg"])):
            return path
    listed = ", ".join(f"{p.name} (nimg {json.loads((p / 'trainer_state.json').read_text())['nimg']})" for p in found)
    raise FileNotFoundError(f"no checkpoint {which!r} in {run_dir / 'checkpoints'}; it holds: {listed or 'none'} "
                            "(keep more with train.keep_checkpoints)")


@hookimpl
def fewstep_load_checkpoint(ctx: RunContext, accelerator: Any, nets: Nets, checkpoint: Path | None) -> dict[str, Any] | None:
    found = checkpoint_dirs(ctx.run_dir)
    if checkpoint is None and not found:
        return None
    _skip_accelerate_models(accelerator)
    latest = Path(checkpoint) if checkpoint is not None else found[-1]
    for name in nets.names():
        path = latest / "nets" / f"{name}.safetensors"
        if not path.is_file():
            raise damaged_checkpoint(latest, found, FileNotFoundError(f"no weights for network {name!r} at {path}"))
    try:
        for name in nets.names():
            load_model(unwrap(nets.get(name)), str(latest / "nets" / f"{name}.safetensors"), device=str(ctx.device))
        accelerator.load_state(str(latest / "accelerate"))
        return json.loads((latest / "trainer_state.json").read_text())
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise damaged_checkpoint(latest, found, exc) from exc


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be read back."""


def damaged_checkpoint(path: Path, found: list[Path], exc: BaseException) -> CheckpointError:
    """The error for a checkpoint that fails to load (truncated or corrupted file, other architecture), with
    the fix: resume from the previous complete checkpoint, which fewstep keeps (train.keep_checkpoints)."""
    earlier = [p for p in found if p != path]
    fix = (f"delete {path} to resume from the previous checkpoint {earlier[-1].name}" if earlier else
           "no earlier checkpoint is kept: delete it and start again")
    return CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).strip()[:300]}); it was "
                           f"damaged after it was written, or comes from another recipe: {fix}")
