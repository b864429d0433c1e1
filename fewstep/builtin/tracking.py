"""Experiment trackers through accelerate's tracker classes (``tracking.log_with``: tensorboard, wandb, mlflow,
aim, ... whatever accelerate's ``log_with`` accepts). Disable with ``plugins.disable: [tracking]``.

Sent: every logged scalar (losses, ``<group>/lr``, ``<group>/grad_norm``, images/s) averaged over each
``train.log_every_nimg`` interval at the step ``images seen``; the validation grid, one image batch per row;
the resolved recipe, flattened to ``section.field`` keys, as the run's hyper-parameters. Only the main process
starts trackers (accelerate's trackers log on the main process only). The trackers are built the way
``Accelerator.init_trackers`` builds them (``LOGGER_TYPE_TO_CLASS[name](project, logging_dir, **kwargs)``, then
``start()`` and ``store_init_configuration``), owned by this plugin so that disabling it switches them off.
"""

from __future__ import annotations

import time
from typing import Any

from fewstep.builtin.logging import Window
from fewstep.hookspecs import hookimpl
from fewstep.types import Cond, Nets, RunContext, StepInfo


def flat_hparams(data: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> ``{"train.batch_size": 64, ...}``; values trackers cannot store as hyper-parameters
    (lists, None, dicts that are empty) become their string form."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Tracking:
    """One instance per run (the plugin manager registers a fresh one)."""

    def __init__(self) -> None:
        self.trackers: list[Any] = []
        self.window = Window()
        self.last_nimg, self.last_time = 0, 0.0

    @hookimpl
    def fewstep_on_train_start(self, ctx: RunContext, nets: Nets, step: StepInfo) -> None:
        cfg = ctx.config.tracking
        self.last_nimg, self.last_time = step.nimg, time.perf_counter()
        if not cfg.log_with or not ctx.is_main:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        project = cfg.project or ctx.run_dir.name
        logging_dir = cfg.logging_dir or ctx.run_dir / "trackers"
        for name in dict.fromkeys(cfg.log_with):
            cls = LOGGER_TYPE_TO_CLASS[name]
            kwargs = cfg.init_kwargs.get(name, {})
            try:
                tracker = cls(project, logging_dir, **kwargs) if cls.requires_logging_directory else cls(project, **kwargs)
                tracker.start()
            except ImportError as exc:
                raise RuntimeError(f"tracking.log_with: {name!r} needs its package ({exc}); pip install {name}, or "
                                   f"remove {name!r} from tracking.log_with") from None
            self.trackers.append(tracker)
        hparams = flat_hparams(ctx.config.dump())
        for tracker in self.trackers:
            tracker.store_init_configuration(hparams)

    @hookimpl
    def fewstep_on_step_end(self, ctx: RunContext, step: StepInfo, logs: dict[str, Any]) -> None:
        if not self.trackers:
            return
        self.window.add(logs)
        if not Window.closes(ctx, step):
            return
        now = time.perf_counter()
        values = self.window.pop()
        values["images_per_s"] = (step.nimg - self.last_nimg) / max(now - self.last_time, 1e-9)
        for tracker in self.trackers:
            tracker.log(values, step=step.nimg)
        self.last_nimg, self.last_time = step.nimg, now

    @hookimpl
    def fewstep_on_validation(self, ctx: RunContext, step: StepInfo, images: dict[str, Any], cond: Cond | None) -> None:
        if not self.trackers or not ctx.config.tracking.images or not images:
            return
        from fewstep.images import to_uint8

        rows = {f"validation/{label}": to_uint8(x.float().cpu()) for label, x in images.items()}  # (N, H, W, C)
        for tracker in self.trackers:
            if not hasattr(tracker, "log_images"):
                continue
            if tracker.name == "tensorboard":
                tracker.log_images(rows, step=step.nimg, dataformats="NHWC")
            else:  # one image per array: (H, W) for grey, (H, W, C) for colour
                tracker.log_images({k: list(v[..., 0] if v.shape[-1] == 1 else v) for k, v in rows.items()},
                                   step=step.nimg)

    @hookimpl
    def fewstep_on_train_end(self, ctx: RunContext, nets: Nets) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def plugin() -> Tracking:
    return Tracking()
