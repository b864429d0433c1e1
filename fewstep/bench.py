"""``fewstep bench RECIPE``: training throughput of a recipe, without changing what a step computes.

Two passes over the trainer's own step (``Trainer.train_step``: ``Trainer.train_group`` for every due group, then
``fewstep_on_step_end``), after ``warmup`` steps that are not measured:

1. *plain*: ``steps`` steps with nothing added -> images/s, seconds per step, peak memory;
2. *split*: ``steps`` more steps with timers around the step's parts -> seconds per step spent on data
   (``Trainer.batch``), teacher forwards (forward hooks on the teacher's network), student-side forwards
   (every trainable network's forward, the target passes included), backward (``accelerator.backward``),
   the optimizer (``step`` and ``zero_grad``), plugin hooks other than the loss (pluggy's hook-call
   monitoring: EMA, logging, trackers...), the rest of the loss hook, and what remains (trainer). On a GPU
   each timer boundary synchronises the device, which is why the split is a separate pass.

One extra step runs under ``torch.utils.flop_counter.FlopCounterMode``: FLOPs per step (forward and backward
of every network) -> achieved FLOP/s and, given the device's peak (``--peak-tflops`` or the table below for
known GPUs), the model FLOP utilisation (MFU). Warm-up and measured steps train the networks: a benchmark
leaves no run behind that is worth keeping (it writes into a temporary run folder unless given one).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets (SXM parts); unverified for other
# form factors, which is why --peak-tflops overrides them.
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                    "RTX 4090": 165.0, "V100": 125.0}


def bench_config(config: Any, total_steps: int) -> Any:
    """The recipe with a training length of ``total_steps`` optimizer steps, no validation, checkpoints or
    export during the benchmark."""
    batch = config.train.batch_size
    train = config.train.model_copy(update={"total_nimg": total_steps * batch, "progress_bar": False,
                                            "checkpoint_every_nimg": None, "checkpoint_every_s": None,
                                            "max_wall_s": None})
    return config.model_copy(update={
        "train": train,
        "validation": config.validation.model_copy(update={"every_nimg": None}),
        "export": config.export.model_copy(update={"enabled": False}),
    })


def bench_trainer(config: Any, pm: Any, run_dir: Path, total_steps: int) -> Any:
    """A set-up Trainer of ``config`` for ``total_steps`` steps, training started (hooks told), ready for
    :func:`run_step`. SIGTERM and Ctrl-C keep their default effect (no checkpoint to write)."""
    from fewstep.trainer import Trainer

    trainer = Trainer(bench_config(config, total_steps), pm, run_dir)
    trainer.setup()
    pm.hook.fewstep_on_train_start(ctx=trainer.ctx, nets=trainer.nets, step=trainer.step_info())
    return trainer


class Timers:
    """Accumulated wall seconds per part; ``sync`` makes every boundary wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"
        self.active = False

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # host-device sync: the split pass only
        return time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        t0 = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - t0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)

        return timed

    def forward_hooks(self, module: torch.nn.Module, name: str) -> list[Any]:
        """Time ``module``'s forward calls (outermost call only, so a network calling itself is not counted twice)."""
        depth = [0]
        start = [0.0]

        def pre(*_: Any) -> None:
            if self.active and depth[0] == 0:
                start[0] = self.now()
            depth[0] += 1

        def post(*_: Any) -> None:
            depth[0] -= 1
            if self.active and depth[0] == 0:
                self.seconds[name] += self.now() - start[0]

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def run_step(trainer: Any) -> None:
    """One optimizer step exactly as ``Trainer.fit`` takes it (every due group, then the step-end hook)."""
    trainer.train_step(trainer.phase_at(trainer.state.nimg))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def instrument(trainer: Any, timers: Timers) -> None:
    """Timers around the parts of a step; the networks, losses and updates are untouched."""
    trainer.batch = timers.wrap("data", trainer.batch)
    acc = trainer.accelerator
    acc.backward = timers.wrap("backward", acc.backward)
    for opt in trainer.optimizers.values():
        opt.step = timers.wrap("optimizer", opt.step)
        opt.zero_grad = timers.wrap("optimizer", opt.zero_grad)
    timers.forward_hooks(trainer.nets.teacher.net, "teacher forward")
    trainable = {n for g in trainer.groups.values() for n in g.modules}
    for name in trainable:
        timers.forward_hooks(trainer.nets.get(name), "student forward")
    starts: dict[str, float] = {}

    def before(hook_name: str, *_: Any) -> None:
        if timers.active:
            starts[hook_name] = timers.now()

    def after(_outcome: Any, hook_name: str, *_: Any) -> None:
        if timers.active and hook_name in starts:
            timers.seconds["loss hook" if hook_name == "fewstep_loss" else "hooks"] += timers.now() - starts.pop(hook_name)

    trainer.pm.add_hookcall_monitoring(before, after)


def step_flops(trainer: Any) -> int:
    """FLOPs of one optimizer step (every network's forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_step(trainer)
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def bench(config: Any, pm: Any, *, warmup: int = 3, steps: int = 10, run_dir: Path | None = None,
          peak: float | None = None, detail: bool = True) -> dict[str, Any]:
    """Benchmark ``config`` (a validated RunConfig) with the plugin manager ``pm``; returns the report.
    ``detail=False`` runs the plain pass only (no split, no FLOP count: those fields are None)."""
    from fewstep.trainer import peak_memory_mb

    if warmup < 1 or steps < 1:
        raise ValueError(f"bench: --warmup ({warmup}) and --steps ({steps}) must be at least 1")
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fewstep-bench-")))
        t0 = time.perf_counter()
        trainer = bench_trainer(config, pm, run_dir, warmup + 2 * steps + 1)  # + 1: the FLOP-counted step
        setup_s = time.perf_counter() - t0
        device = trainer.ctx.device
        t0 = time.perf_counter()
        for _ in range(warmup):
            run_step(trainer)
        _sync(device)
        warmup_s = time.perf_counter() - t0
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step(trainer)
        _sync(device)
        plain_s = time.perf_counter() - t0
        peak_mb = peak_memory_mb(device)
        timers = Timers(device)
        split_total, flops = None, None
        if detail:
            instrument(trainer, timers)
            timers.active = True
            t0 = timers.now()
            for _ in range(steps):
                run_step(trainer)
            split_total = timers.now() - t0
            timers.active = False
            flops = step_flops(trainer)
        pm.hook.fewstep_on_train_end(ctx=trainer.ctx, nets=trainer.nets)  # closes logs and trackers
    step_s = plain_s / steps
    split = achieved = tflops = None
    if detail:
        split = {k: v / steps for k, v in timers.seconds.items()}
        inner = split.get("teacher forward", 0.0) + split.get("student forward", 0.0)
        split["loss (rest)"] = split.pop("loss hook", 0.0) - inner
        split["trainer (rest)"] = split_total / steps - sum(split.values())
        tflops = peak_tflops(device, peak)
        achieved = flops / step_s / 1e12
    return {
        "recipe_method": config.method.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mixed_precision": config.train.mixed_precision,
        "compile": config.train.compile,
        "global_batch": trainer.global_batch,
        "processes": trainer.ctx.world_size,
        "torch_threads": torch.get_num_threads(),
        "warmup_steps": warmup,
        "steps": steps,
        "setup_s": round(setup_s, 3),
        "warmup_s": round(warmup_s, 3),
        "step_s": step_s,
        "images_per_s": trainer.global_batch / step_s,
        "split_s_per_step": split,
        "split_pass_step_s": split_total / steps if detail else None,
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": "GPU max allocated" if device.type == "cuda" else "process max resident (CPU)",
        "flops_per_step": flops,
        "achieved_tflops": achieved,
        "peak_tflops": tflops,
        "mfu": achieved / tflops if detail and tflops else None,
    }


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines of a :func:`bench` report."""
    head = (f"{report['recipe_method']} on {report['device']}: {report['images_per_s']:.1f} images/s, "
            f"{1000 * report['step_s']:.1f} ms/step, peak memory {report['peak_memory_mb']:.0f} MB")
    if report["split_s_per_step"] is None:
        return head
    lines = [f"{report['recipe_method']} on {report['device']} ({report['mixed_precision']}, compile="
             f"{report['compile']}): {report['images_per_s']:.1f} images/s, {1000 * report['step_s']:.1f} ms/step "
             f"(batch {report['global_batch']}), peak memory {report['peak_memory_mb']:.0f} MB",
             f"  {report['flops_per_step'] / 1e9:.2f} GFLOP/step, {report['achieved_tflops']:.3f} TFLOP/s"
             + (f", MFU {100 * report['mfu']:.1f} %" if report["mfu"] is not None else ", MFU: no peak known "
                "(--peak-tflops)"),
             "  split (ms/step, timed pass " f"{1000 * report['split_pass_step_s']:.1f} ms/step):"]
    for k, v in sorted(report["split_s_per_step"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k:<18} {1000 * v:8.2f}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
