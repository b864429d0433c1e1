"""Metrics as JSON lines (``RUN/metrics.jsonl``) and a progress bar with images/s and loss."""

from __future__ import annotations

import json
import time
from typing import Any

from fewstep.hookspecs import hookimpl
from fewstep.types import Nets, RunContext, StepInfo


class Window:
    """Means of the logged values over one logging window (``train.log_every_nimg``), each key over the steps
    that logged it: a group that steps every k-th step (TTUR generators) is averaged over its own steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    @staticmethod
    def closes(ctx: RunContext, step: StepInfo) -> bool:
        """Whether this step ends a window: it crossed a multiple of log_every_nimg, or training ends."""
        every = ctx.config.train.log_every_nimg
        return step.nimg // every != (step.nimg - ctx.global_batch) // every or step.nimg >= step.total_nimg

    def pop(self) -> dict[str, float]:
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


class MetricsLogger:
    """One instance per run (the plugin manager registers a fresh one), so runs never share state."""

    def __init__(self) -> None:
        self.window = Window()
        self.bar: Any = None
        self.file: Any = None
        self.last_nimg = 0
        self.last_time = 0.0

    @hookimpl
    def fewstep_on_train_start(self, ctx: RunContext, nets: Nets, step: StepInfo) -> None:
        self.last_nimg, self.last_time = step.nimg, time.perf_counter()
        if not ctx.is_main:
            return
        self.file = open(ctx.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed at train end
        if ctx.config.train.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=step.total_nimg, initial=step.nimg, unit="img", dynamic_ncols=True,
                            desc=ctx.method.name)

    @hookimpl
    def fewstep_on_step_end(self, ctx: RunContext, step: StepInfo, logs: dict[str, float]) -> None:
        self.window.add(logs)
        if not Window.closes(ctx, step):
            if self.bar is not None:
                self.bar.update(ctx.global_batch)
            return
        now = time.perf_counter()
        rate = (step.nimg - self.last_nimg) / max(now - self.last_time, 1e-9)
        means = self.window.pop()
        if self.file is not None:
            line = {"step": step.step, "nimg": step.nimg, "phase": step.phase, "images_per_s": round(rate, 2), **means}
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        if self.bar is not None:
            loss = next((v for k, v in means.items() if k.endswith("/loss")), float("nan"))
            self.bar.set_postfix({"img/s": f"{rate:.0f}", "loss": f"{loss:.4g}"})
            self.bar.update(ctx.global_batch)
        self.last_nimg, self.last_time = step.nimg, now

    @hookimpl
    def fewstep_on_train_end(self, ctx: RunContext, nets: Nets) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def plugin() -> MetricsLogger:
    return MetricsLogger()
