"""Checkpoints: every network as safetensors plus accelerate's state (optimizers, grad scaler, RNG).

Layout: ``RUN/checkpoints/step-XXXXXXXX/{nets/<name>.safetensors, accelerate/, trainer_state.json}``.
A checkpoint is written into a hidden temporary folder and renamed into place only when complete, so
an interrupted write never leaves a checkpoint that ``--resume`` would pick up. The teacher is never
saved (it is a frozen input). accelerate's own model saving is switched off: fewstep writes every
network itself, trainable or not (targets, EMA), in one format.

Under FSDP2 (docs/DISTRIBUTED.md) the networks are sharded: every process takes part in gathering each network's
full state dict (``Accelerator.get_state_dict``) and the main process writes the same files as under DDP, so a
checkpoint does not depend on the number of processes and export reads it unchanged. accelerate's ``save_state``
pairs its i-th optimizer with its i-th model under FSDP, which fewstep's optimizer groups do not follow (a network
in two groups, a group over two networks), so the optimizer states go through accelerate's FSDP optimizer helpers
with all networks as one module (``optimizers/``; full or sharded as the accelerate config's
``fsdp_state_dict_type`` says), and the grad scaler's state beside them. Random states are not saved: every draw
of a step is seeded from (seed, images seen).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model

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
    if getattr(accelerator, "is_fsdp2", False):
        _save_sharded(accelerator, nets, tmp)
    else:
        accelerator.save_state(str(tmp / "accelerate"))
        for name in nets.names():
            path = str(tmp / "nets" / f"{name}.safetensors")
            if (engine := _deepspeed_engine(accelerator, nets.get(name))) is not None:
                # cloned out of DeepSpeed's flat buffers; gathered from every process under ZeRO-3 (collective)
                whole = accelerator.get_state_dict(engine)
                if ctx.is_main:
                    save_file({k: v.contiguous() for k, v in whole.items()}, path)
            elif ctx.is_main:
                save_model(unwrap(nets.get(name)), path)
    if ctx.is_main:
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
        if getattr(accelerator, "is_fsdp2", False):
            _load_sharded(accelerator, nets, latest)
        else:
            for name in nets.names():
                if _deepspeed_engine(accelerator, nets.get(name)) is None:  # DeepSpeed's own checkpoint has it
                    load_model(unwrap(nets.get(name)), str(latest / "nets" / f"{name}.safetensors"),
                               device=str(ctx.device))
            accelerator.load_state(str(latest / "accelerate"))
        return json.loads((latest / "trainer_state.json").read_text())
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise damaged_checkpoint(latest, found, exc) from exc


def _deepspeed_engine(accelerator: Any, module: Any) -> Any:
    """The DeepSpeed engine accelerate built around ``module`` (a trainable network under DeepSpeed), else None."""
    if str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)) != "DEEPSPEED":
        return None
    return next((m for m in accelerator._models if unwrap(m) is unwrap(module)), None)


def _all_networks(nets: Nets) -> Any:
    """Every network as one module (``student.*``, ``ema.*``...): the optimizers' parameters are all inside it."""
    from torch import nn

    return nn.ModuleDict({name: unwrap(nets.get(name)) for name in nets.names()})


def _save_sharded(accelerator: Any, nets: Nets, tmp: Path) -> None:
    """FSDP2: whole networks gathered to the main process, optimizer states through accelerate's FSDP helpers.
    Collective: every process calls it."""
    from accelerate.utils import save_fsdp_optimizer

    for name in nets.names():
        state = accelerator.get_state_dict(nets.get(name))  # full, on the main process's CPU
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "nets" / f"{name}.safetensors"))
    everything = _all_networks(nets)
    # accelerate's own list of prepared optimizers, in the order the trainer prepared its groups
    for i, opt in enumerate(accelerator._optimizers):
        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, opt, everything, str(tmp / "optimizers"), i)
    if accelerator.is_main_process and accelerator.scaler is not None:
        import torch

        torch.save(accelerator.scaler.state_dict(), tmp / "optimizers" / "scaler.pt")


def _load_sharded(accelerator: Any, nets: Nets, latest: Path) -> None:
    """FSDP2: every process reads the whole networks and keeps its shards; then the optimizer states."""
    import torch
    from accelerate.utils import load_fsdp_optimizer
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for name in nets.names():
        state = load_file(str(latest / "nets" / f"{name}.safetensors"))
        set_model_state_dict(nets.get(name), state, options=StateDictOptions(full_state_dict=True))
    everything = _all_networks(nets)
    for i, opt in enumerate(accelerator._optimizers):
        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, opt, everything, str(latest / "optimizers"), i)
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(torch.load(latest / "optimizers" / "scaler.pt", weights_only=True))


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
