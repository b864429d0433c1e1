"""The training loop (DESIGN.md §6): one loop for every method; the only user of accelerate besides
the checkpoint plugin and the CLI.

For each batch, for each optimizer group due this step in the current phase: gradients go only to
that group's networks; micro-batches are accumulated; ``fewstep_loss`` computes per-sample losses;
the trainer back-propagates the mean, clips, steps, zeroes and calls
``fewstep_after_optimizer_step``. Durations and intervals are in images seen, and every random draw
is a function of (seed, images seen), so a resumed run replays exactly and a 2-process run equals a
1-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep import lora
from fewstep.config import RunConfig
from fewstep.data import DataStream, IndexStream, RecordDataset, Samples, build_data, encode_latents
from fewstep.nn import requires_grad, unwrap
from fewstep.reliability import NonFiniteError, RunStopped, StopSignals, nonfinite_tensors
from fewstep.steplog import StepLog, gated_step, grad_norm
from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, Phase, RunContext, StepInfo

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """A plugin broke the trainer's contract (e.g. a loss of the wrong shape)."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


@dataclass
class TrainState:
    step: int = 0
    nimg: int = 0
    skipped: int = 0  # optimizer steps skipped for non-finite values (train.nonfinite: skip)


class Trainer:
    """Builds a run from a validated config and a plugin manager, then :meth:`fit` trains it."""

    def __init__(self, config: RunConfig, pm: Any, run_dir: Path, *, resume: bool = False,
                 checkpoint: Path | None = None, accelerator: Any = None) -> None:
        """resume: restore the latest checkpoint of ``run_dir`` (or ``checkpoint``, a checkpoint folder)."""
        self.config, self.pm, self.run_dir, self.resume = config, pm, Path(run_dir), resume
        self.checkpoint = checkpoint
        self._accelerator = accelerator
        self.state = TrainState()
        self._teacher_rows: dict[str, torch.Tensor] | None = None  # the frozen teacher's grid row, sampled once
        self.signals = StopSignals()
        self._in_step = False

    # ------------------------------------------------------------------ the loop (one screen)
    def fit(self) -> Nets:
        with self.signals:  # SIGTERM / SIGUSR1 / Ctrl-C: checkpoint at the next step boundary, RunStopped
            self.setup()
            hook, ctx, s = self.pm.hook, self.ctx, self.state
            hook.fewstep_on_train_start(ctx=ctx, nets=self.nets, step=self.step_info())
            phase = self.phase_at(s.nimg)
            try:
                while s.nimg < self.total_nimg:
                    self.train_step(phase)
                    if s.nimg < self.total_nimg and (nxt := self.phase_at(s.nimg)) is not phase:
                        hook.fewstep_on_phase_end(ctx=ctx, phase=phase, nets=self.nets)
                        phase = nxt
                    if self._crossed(self.config.validation.every_nimg):
                        self.validate()
                    self.step_boundary()
            except KeyboardInterrupt:  # a Ctrl-C after a stop request (abort), or one raised by a hook
                if self.signals.received is None and not self._in_step:  # mid-step: half-updated networks
                    self.save_checkpoint()
                raise
        hook.fewstep_on_phase_end(ctx=ctx, phase=phase, nets=self.nets)
        self.finish()
        return self.nets

    # ------------------------------------------------------------------ one step, one optimizer group
    def train_step(self, phase: Phase) -> None:
        """Every due group of ``phase`` trains, then ``fewstep_on_step_end`` gets the logging window's means at
        the step that closes it (``train.log_every_nimg``, or the last step) and nothing at the others: the log
        is read from the device there, the only host sync of the hot path (fewstep.steplog)."""
        s = self.state
        self._in_step = True
        for group in self.due_groups(phase, s.step):
            self.train_group(group)
        s.step, s.nimg, self._in_step = s.step + 1, s.nimg + self.global_batch, False
        logs: dict[str, float] = {}
        if self._crossed(self.config.train.log_every_nimg) or s.nimg >= self.total_nimg:
            self.read_log()
            logs = self.log.window()
        self.pm.hook.fewstep_on_step_end(ctx=self.ctx, step=self.step_info(), logs=logs)

    def train_group(self, group: OptimizerGroup) -> None:
        acc, s = self.accelerator, self.state
        others = [self.nets.get(n) for g in self.groups.values() if g is not group for n in g.modules
                  if n not in group.modules]
        view = self.nets.replace(**{n: self.wrapped[n] for n in group.modules})
        rounds = self.config.train.accumulation
        totals: dict[str, torch.Tensor | float] = {}  # tensors summed on the device: no host sync until the step
        opt = self.optimizers[group.name]
        lr = group.lr_at(s.nimg + self.global_batch)
        if group.lr_scale is not None:  # a schedule: a pure function of where training stands
            lr *= float(group.lr_scale(self.step_info(0, group)))
        # Set before the backward passes: DeepSpeed steps the optimizer inside the last one (Accelerator.backward)
        for pg in opt.param_groups:
            pg["lr"] = lr
        with requires_grad(others, False):
            for micro in range(rounds):
                batch = self.batch(micro)
                info = self.step_info(micro, group)
                seed_global(mix_seed(self.config.train.seed, self.ctx.rank, s.nimg, micro, self.group_index[group.name]),
                            self.ctx.device)
                sync = contextlib.ExitStack()
                if micro < rounds - 1:  # skip the gradient all-reduce until the last micro-batch
                    for n in group.modules:
                        sync.enter_context(acc.no_sync(self.wrapped[n]))
                with sync:
                    with self._autocast():
                        out = self.pm.hook.fewstep_loss(ctx=self.ctx, group=group, batch=batch, nets=view, step=info)
                        loss = self._check_loss(out, group, batch).mean()
                    acc.backward(loss / rounds)
                for k, v in {"loss": loss.detach(), **out.terms}.items():
                    # a Python float stays on the host: a host-to-GPU copy of it would wait for the GPU
                    v = v.detach().float().reshape(()) / rounds if isinstance(v, torch.Tensor) else float(v) / rounds
                    totals[k] = totals[k] + v if k in totals else v
        params = self._group_params[group.name]
        norm = None
        if group.max_grad_norm is not None:  # the clipping norm is the guard's norm: computed once
            norm = acc.clip_grad_norm_(params, group.max_grad_norm)
        elif self.config.train.mixed_precision != "fp16":  # fp16: the grad scaler skips non-finite steps itself
            norm = grad_norm([p.grad for p in params if p.grad is not None])
        values = {k: v for k, v in totals.items() if isinstance(v, torch.Tensor)}
        if norm is not None:
            values["grad_norm"] = norm
        bad, skip = self.log.guard(values["loss"], norm)
        # Skipped on the device: parameters and optimizer state stay untouched (docs/RELIABILITY.md)
        gated_step(opt, skip)
        # Observers run before the gradients are dropped, so they can inspect them (tests do). After a skipped
        # step they see unchanged weights (the EMA moves towards them, finite either way).
        with self._whole(group):
            self.pm.hook.fewstep_after_optimizer_step(ctx=self.ctx, group=group, nets=self.nets,
                                                      step=self.step_info(0, group))
        opt.zero_grad(set_to_none=True)
        host = {k: v for k, v in totals.items() if not isinstance(v, torch.Tensor)}
        self.log.add(group.name, s.step, values, {**host, "lr": lr}, bad, skip)

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        """accelerate's autocast under mixed precision; without it, nothing (accelerate builds a context each
        call: 4 ms a step on the digits CD recipe, issue 15)."""
        acc = self.accelerator
        return acc.autocast() if acc.mixed_precision != "no" else contextlib.nullcontext()

    def read_log(self) -> None:
        """Read the step log from the device (one all-reduce and one host sync): at the end of a logging window
        and before a checkpoint. Non-finite steps found there were skipped on the device; they are counted under
        ``train.nonfinite: skip`` while skips remain, else the run stops here without writing a checkpoint."""
        found = self.log.read()
        if not found.nonfinite:
            return
        train, s = self.config.train, self.state
        group, step, values = found.first
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        where = f"group {group!r} at step {step} ({step * self.global_batch} images): {shown}"
        if train.nonfinite == "skip" and s.skipped + found.nonfinite <= train.max_nonfinite_skips:
            s.skipped += found.nonfinite
            if self.ctx.is_main:
                print(f"fewstep: skipped {found.nonfinite} non-finite step(s) up to step {s.step} "
                      f"({s.skipped}/{train.max_nonfinite_skips} in the run), the first in {where}",
                      file=sys.stderr, flush=True)
            return
        reason = (f"more than train.max_nonfinite_skips={train.max_nonfinite_skips} skipped steps"
                  if train.nonfinite == "skip" else "train.nonfinite: stop")
        raise NonFiniteError(f"non-finite values in {where} ({reason}); that step and the {s.step - step - 1} after "
                             "it were not applied; no checkpoint written, the earlier ones in "
                             f"{self.run_dir / 'checkpoints'} are kept. Fix: lower optimizer.lr or set "
                             "optimizer.max_grad_norm, then --resume --allow-config-change (or start again); "
                             "train.nonfinite: skip tolerates rare spikes")

    def local_flags(self) -> list[float]:
        """This process's (stop signal received, checkpoint due by time, over the wall-time budget), as 0/1."""
        train, now = self.config.train, time.perf_counter()
        return [float(self.signals.received is not None),
                float(train.checkpoint_every_s is not None and now - self._t_ckpt >= train.checkpoint_every_s),
                float(train.max_wall_s is not None and now - self._t0 >= train.max_wall_s)]

    def agreed_flags(self) -> list[float]:
        """:meth:`local_flags` summed over processes, so that every rank takes the same stop and checkpoint
        decisions after the same step: a host-side all-reduce of three numbers (gloo, CPU tensors), which never
        waits for the accelerator's queue. One process: its own flags, no communication."""
        flags = self.local_flags()
        if self.ctx.world_size == 1:
            return flags
        import torch.distributed as dist

        vec = torch.tensor(flags)
        dist.all_reduce(vec, group=self._flag_group)
        return vec.tolist()

    @staticmethod
    def _check_loss(out: LossOutput | None, group: OptimizerGroup, batch: Batch) -> torch.Tensor:
        if out is None:
            raise TrainingError("no active plugin implements fewstep_loss; the method plugin must provide it")
        loss = out.loss
        if loss.ndim != 1 or loss.shape[0] != batch.size:
            raise TrainingError(f"fewstep_loss for group {group.name!r} returned shape {tuple(loss.shape)}; "
                                f"expected per-sample losses of shape ({batch.size},)")
        return loss

    # ------------------------------------------------------------------ schedule
    def phase_at(self, nimg: int) -> Phase:
        for phase, end in zip(self.phases, self.phase_ends):
            if nimg < end:
                return phase
        return self.phases[-1]

    def due_groups(self, phase: Phase, step: int) -> list[OptimizerGroup]:
        """The groups that step now: those of the current phase whose interval divides the step."""
        return [self.groups[name] for name in phase.groups if self.groups[name].due(step)]

    def _crossed(self, every: int | None) -> bool:
        return every is not None and (self.state.nimg // every) > ((self.state.nimg - self.global_batch) // every)

    def step_info(self, micro: int = 0, group: OptimizerGroup | None = None) -> StepInfo:
        s = self.state
        phase = self.phase_at(s.nimg)
        i = self.phases.index(phase)
        start = self.phase_ends[i - 1] if i else 0
        span = (self.phase_ends[i] - start) if math.isfinite(self.phase_ends[i]) else (self.total_nimg - start)
        gi = self.group_index[group.name] if group is not None else 0
        # Not seeded by the micro-round: every round redraws the step's global batch and keeps its rows.
        generator = torch.Generator().manual_seed(mix_seed(self.config.train.seed, s.nimg, gi))
        device = self.ctx.device
        # GPUs: the batch's noise is drawn on the device (no host-to-device copy), from its own stream
        device_generator = (torch.Generator(device).manual_seed(mix_seed(self.config.train.seed, s.nimg, gi, 0xDE7))
                            if device.type != "cpu" else None)
        return StepInfo(step=s.step, nimg=s.nimg, total_nimg=self.total_nimg, phase=phase.name,
                        phase_progress=min(1.0, (s.nimg - start) / max(span, 1)),
                        progress=min(1.0, s.nimg / self.total_nimg), generator=generator,
                        rank=self.ctx.rank, world_size=self.ctx.world_size, local_batch=self.local_batch,
                        global_batch=self.global_batch,
                        offset=(micro * self.ctx.world_size + self.ctx.rank) * self.local_batch, device=device,
                        device_generator=device_generator)

    # ------------------------------------------------------------------ data
    def batch(self, micro: int) -> Batch:
        """This process's slice of global micro-batch ``micro`` of the current step."""
        g_micro = self.local_batch * self.ctx.world_size
        start = self.state.nimg + micro * g_micro
        lo = self.ctx.rank * self.local_batch
        s = self.stream.read(start, g_micro, lo, self.local_batch)
        x = s.x.to(self.ctx.device) if s.x is not None else None
        if x is not None and not s.latent and self.nets.teacher.vae is not None:
            x = self.nets.teacher.encode(x)  # data.cache: off: live VAE encoding
        cond, uncond = self.make_cond(s.labels, s.prompts, self.local_batch, samples=s)
        if self.nets.teacher.net.image_channels:
            cond, uncond = self.condition_images(x, cond, uncond, micro)
        if self.pairs is None:
            return Batch(x0=x, cond=cond, uncond=uncond)
        pidx = self.pair_stream.indices(start, g_micro)[lo : lo + self.local_batch]
        noise, x_pair, p_labels, p_prompts = self.pairs.get(pidx)
        pair_cond, _ = self.make_cond(p_labels, p_prompts, len(pidx))
        return Batch(x0=x, cond=cond, uncond=uncond, pairs=(noise.to(self.ctx.device), x_pair.to(self.ctx.device)),
                     pair_cond=pair_cond)

    def make_cond(self, labels: torch.Tensor | None, prompts: tuple[str, ...] | None, n: int,
                  samples: Samples | None = None) -> tuple[Cond, Cond | None]:
        """cond and uncond of a batch: cached text embeddings when ``samples`` has them, negative prompts as the
        uncond where the data has them, and the data's size conditioning as ``added`` where the teacher's
        conditioning carries SDXL time ids (fewstep.data.Samples)."""
        teacher, device = self.nets.teacher, self.ctx.device
        if teacher.conditioning == "class":
            cond = Cond(labels=labels.to(device))
        elif teacher.conditioning == "text":
            if samples is not None and samples.text is not None:
                cond = samples.text.to(device, teacher.dtype)
            else:
                cond = teacher.encode_prompts(list(prompts) if prompts is not None else [""] * n)
        else:
            return Cond(), None
        uncond = teacher.null_cond(n, device=device)
        if samples is not None and samples.negative_text is not None:
            uncond = samples.negative_text.to(device, teacher.dtype)
        elif samples is not None and samples.negatives is not None and teacher.conditioning == "text":
            uncond = teacher.encode_prompts(list(samples.negatives))
        if samples is not None and samples.size_cond is not None and cond.added is not None and cond.added.shape[-1] == 6:
            added = samples.size_cond.to(device, cond.added.dtype)
            cond, uncond = replace(cond, added=added), replace(uncond, added=added)
        return cond, uncond

    def condition_images(self, x: torch.Tensor | None, cond: Cond, uncond: Cond | None,
                         micro: int) -> tuple[Cond, Cond | None]:
        """cond and uncond with the image-conditioned teacher's condition image of x (fewstep.imagecond); its
        augmentation noise is drawn for the global micro-batch from its own stream of (seed, images seen)."""
        from fewstep.imagecond import require_image_condition

        transform = require_image_condition(self.nets.teacher, pairs=self.pairs is not None)
        info = replace(self.step_info(micro), device_generator=None,
                       generator=torch.Generator().manual_seed(mix_seed(self.config.train.seed, self.state.nimg, 0x1CD)))
        return transform.attach(x, cond, uncond, info.randn_like(x) if x is not None else None)

    # ------------------------------------------------------------------ setup
    @property
    def accelerator(self) -> Any:
        if self._accelerator is None:
            from accelerate import Accelerator

            from fewstep.distributed import check_features, check_mixed_precision

            train = self.config.train
            check_mixed_precision(train.mixed_precision)  # the launcher's config may not contradict the recipe
            check_features(train.gradient_checkpointing, train.compile)
            self._accelerator = Accelerator(mixed_precision=self.config.train.mixed_precision, cpu=self.config.train.cpu)
        return self._accelerator

    def setup(self) -> None:
        cfg, acc, hook = self.config, self.accelerator, self.pm.hook
        world = acc.num_processes
        per_round = cfg.train.batch_size // cfg.train.accumulation
        if cfg.train.batch_size % (cfg.train.accumulation * world):
            raise TrainingError(f"train.batch_size={cfg.train.batch_size} is not divisible by train.accumulation "
                                f"({cfg.train.accumulation}) x processes ({world}); pick a multiple of "
                                f"{cfg.train.accumulation * world}")
        self.global_batch, self.local_batch = cfg.train.batch_size, per_round // world
        self.total_nimg = cfg.train.total_nimg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = RunContext(method=cfg.method, config=cfg, device=acc.device, dtype=_DTYPES[cfg.train.mixed_precision],
                              run_dir=self.run_dir, seed=cfg.train.seed, rank=acc.process_index, world_size=world,
                              global_batch=self.global_batch, local_batch=self.local_batch,
                              is_main=acc.is_main_process)
        hook.fewstep_configure(config=cfg)
        torch.manual_seed(cfg.train.seed)  # network initialisation is identical on every rank
        teacher = hook.fewstep_build_teacher(ctx=self.ctx)
        student = hook.fewstep_build_student(ctx=self.ctx, teacher=teacher)
        from fewstep.backbones import condition_student

        condition_student(cfg, teacher, student, announce=self.ctx.is_main)  # a capped input level where the teacher needs one (CONDITIONING.md)
        student = lora.adapt_student(cfg, teacher, student)  # a LoRA recipe: an adapter on frozen weights
        extra: dict[str, nn.Module] = {}
        for found in hook.fewstep_extra_networks(ctx=self.ctx, teacher=teacher, student=student):
            if clash := set(found) & (set(extra) | {"student"}):
                raise TrainingError(f"two plugins both provide the network(s) {sorted(clash)}")
            extra.update(found or {})
        extra = lora.share_networks(cfg, student, extra)
        teacher.to(self.ctx.device, self.ctx.dtype)  # after the student and extra networks copied fp32 weights
        check_teacher_finite(teacher)  # on the device (fast) and in the compute dtype (an fp16 overflow shows)
        lora.place_adapters(teacher, [student, *extra.values()], self.ctx.device, self.ctx.dtype)
        self.nets = Nets(teacher, student.to(self.ctx.device), {k: v.to(self.ctx.device) for k, v in extra.items()})
        lora.check_adapter_export(hook, self.ctx, self.nets)  # lora.export: adapter, refused before any work
        self.groups = {g.name: g for g in hook.fewstep_optimizer_groups(ctx=self.ctx, nets=self.nets)}
        self.group_index = {name: i for i, name in enumerate(self.groups)}
        self.phases = hook.fewstep_phases(ctx=self.ctx, groups=list(self.groups.values()))
        self._check_schedule()
        if cfg.train.gradient_checkpointing:
            from fewstep.backbones import enable_gradient_checkpointing

            for name in {n for g in self.groups.values() for n in g.modules}:
                enable_gradient_checkpointing(self.nets.get(name))
        if cfg.train.compile:  # in place: parameter names, checkpoints and exports are unchanged
            from fewstep.compiling import compile_backbones

            compile_backbones({"teacher": teacher.net, **{n: self.nets.get(n) for n in self.nets.names()}},
                              announce=self.ctx.is_main)
        self._prepare_networks(teacher)
        with acc.main_process_first():  # a data cache is built once, by the main process
            self.dataset = self._build_data(teacher)
        self.stream = DataStream(self.dataset, cfg.data, cfg.train.seed, self.local_batch * world)
        self.pairs = None
        if cfg.data.pairs is not None:
            from fewstep.pairs import PairStore

            self.pairs = PairStore(cfg.data.pairs)
            self.pairs.check(teacher)
            self.pair_stream = IndexStream(len(self.pairs), mix_seed(cfg.train.seed, 0x9A125) % 2**31)
        if self.resume:
            restored = hook.fewstep_load_checkpoint(ctx=self.ctx, accelerator=acc, nets=self.nets,
                                                    checkpoint=self.checkpoint)
            if restored is None:
                raise TrainingError(f"no complete checkpoint in {self.run_dir / 'checkpoints'}: the run stopped before "
                                    "its first one; train it with `fewstep distill RECIPE --run-dir "
                                    f"{self.run_dir} --resume` (which starts over when there is none)")
            self.state = TrainState(step=int(restored["step"]), nimg=int(restored["nimg"]),
                                    skipped=int(restored.get("skipped", 0)))
        self._t0, self._nimg0, self._t_end, self._peak_mb = time.perf_counter(), self.state.nimg, None, None
        self._t_ckpt = self._t0  # time-based checkpoints count from the start of this process's training
        budget = cfg.train.max_nonfinite_skips - self.state.skipped if cfg.train.nonfinite == "skip" else 0
        self.log = StepLog(self.ctx.device, budget, lambda t: acc.reduce(t, reduction="sum"), world)
        self._flag_group = None  # the default group when it is gloo; else a gloo group for the stop flags
        if world > 1:
            import torch.distributed as dist

            # every rank calls new_group in the same order (setup runs on all); unverified on a GPU cluster
            self._flag_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _prepare_networks(self, teacher: Any) -> None:
        """Give the trainable networks and their optimizers to accelerate as ``self.plan`` says
        (fewstep.distributed.sharding_plan, docs/DISTRIBUTED.md): DDP wraps each network, FSDP2 shards it in place
        (and its followers, EMA and targets, the same way), DeepSpeed prepares its one network with its optimizer."""
        from fewstep.distributed import accelerator_engine, fingerprint, meta_skeleton, sharding_plan

        cfg, acc = self.config, self.accelerator
        jvp = getattr(cfg.method, "jvp", None)
        if jvp is not None:
            from fewstep.jvp import resolve_mode

            jvp = resolve_mode(jvp, teacher.process)
        self.plan = sharding_plan(accelerator_engine(acc), {g.name: g.modules for g in self.groups.values()},
                                  {n: fingerprint(self.nets.get(n)) for n in self.nets.names()},
                                  lora=cfg.lora is not None, jvp=jvp, accumulation=cfg.train.accumulation,
                                  nonfinite_skip=cfg.train.nonfinite == "skip")
        # gathered into these after training (export, evaluation, final samples read whole weights)
        self._skeletons = {n: meta_skeleton(self.nets.get(n)) for n, p in self.plan.placement.items()
                           if p == "sharded"}
        self.wrapped, self.optimizers = {}, {}
        self._group_params: dict[str, list[nn.Parameter]] = {}
        for group in self.groups.values():
            if self.plan.engine.startswith("zero"):  # one network in one group: one DeepSpeed engine
                (name,) = group.modules
                self._configure_deepspeed(group)
                params = [p for p in self.nets.get(name).parameters() if p.requires_grad]
                self.wrapped[name], self.optimizers[group.name] = acc.prepare(self.nets.get(name),
                                                                              make_optimizer(group, params))
            else:
                for name in group.modules:
                    if name not in self.wrapped:  # FSDP2 shards in place and only through Accelerator.prepare
                        prepare = acc.prepare if self.plan.engine == "fsdp2" else acc.prepare_model
                        self.wrapped[name] = prepare(self.nets.get(name))
                # listed after preparing: FSDP2 replaced the parameters by sharded DTensors
                params = [p for n in group.modules for p in self.nets.get(n).parameters() if p.requires_grad]
                self.optimizers[group.name] = acc.prepare_optimizer(make_optimizer(group, params))
            # every parameter of the group's networks, listed once (clipping and the gradient norm read them)
            self._group_params[group.name] = [p for n in group.modules for p in self.nets.get(n).parameters()]
        if self.plan.engine == "fsdp2":
            from accelerate.utils import fsdp2_prepare_model
            from torch.distributed.fsdp import register_fsdp_forward_method

            for name in self.plan.followers:  # same plugin settings, hence the same shards as their leader
                fsdp2_prepare_model(acc, self.nets.get(name))
                # a root module keeps its weights gathered after forward, awaiting a backward that a frozen
                # network never runs; resharded, they stay shards like the leader's for the EMA/target update
                self.nets.get(name).set_reshard_after_forward(True)
            for name in self._skeletons:  # critics call Backbone.bottleneck / features, not forward (fewstep.gan)
                for method in ("bottleneck", "features"):
                    if callable(getattr(self.nets.get(name), method, None)):
                        register_fsdp_forward_method(self.nets.get(name), method)
        if self.ctx.is_main and self.plan.engine != "ddp":
            print(f"fewstep: {self.plan.describe()}", file=sys.stderr, flush=True)

    def _whole(self, group: OptimizerGroup) -> contextlib.AbstractContextManager[Any]:
        """ZeRO-3: the group's partitioned parameters gathered whole on every process, read-only, for the after-step
        hooks (EMA and target updates read them; unverified: no ZeRO-3 run completed here). Other engines: nothing."""
        if not self.plan.gather_followers:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self._group_params[group.name], modifier_rank=None)

    def _configure_deepspeed(self, group: OptimizerGroup) -> None:
        """Fill the DeepSpeed config's micro-batch, clipping and ZeRO-3 gathering from the run before ``prepare``
        (fewstep.distributed.deepspeed_settings; a config that fixes them otherwise is refused)."""
        from fewstep.distributed import deepspeed_settings

        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in deepspeed_settings(ds, self.local_batch, group.max_grad_norm).items():
            *parents, leaf = key.split(".")
            section = ds
            for parent in parents:
                section = section.setdefault(parent, {})
            section[leaf] = value

    def _check_schedule(self) -> None:
        known = set(self.groups)
        ends, total = [], 0.0
        for i, phase in enumerate(self.phases):
            if missing := set(phase.groups) - known:
                raise TrainingError(f"phase {phase.name!r} names unknown optimizer group(s) {sorted(missing)}; "
                                    f"groups: {sorted(known)}")
            if phase.duration_nimg is None and i != len(self.phases) - 1:
                raise TrainingError(f"phase {phase.name!r}: only the last phase may run until the end (duration_nimg=None)")
            total += phase.duration_nimg if phase.duration_nimg is not None else math.inf
            ends.append(total)
        if math.isfinite(total) and total < self.total_nimg:
            ends[-1] = math.inf  # the last phase runs to the end of training
        self.phase_ends = ends
        for name in {n for g in self.groups.values() for n in g.modules}:
            self.nets.get(name).requires_grad_(True).train()

    def _build_data(self, teacher: Any) -> Any:
        cfg = self.config.data
        update: dict[str, Any] = {}
        c, h, _ = teacher.data_shape
        if cfg.resolution is None:
            update["resolution"] = h
        elif cfg.resolution != h:
            raise TrainingError(f"data.resolution={cfg.resolution} but the teacher generates {h}x{h} images; "
                                f"remove data.resolution or set it to {h}")
        if cfg.channels is None:
            update["channels"] = c
        if teacher.conditioning == "class":
            update["class_conditional"] = True
        from fewstep.data import check_data, require_source
        from fewstep.paths import cache_dir, cache_key

        require_source(cfg, self.config.teacher.pretrained)
        dataset = build_data(cfg.model_copy(update=update), cache_root=cache_dir())
        if isinstance(dataset, RecordDataset):  # read per batch: latents and text embeddings from a disk cache
            from fewstep.cache import prepare_cache

            check_data(self.config, teacher, dataset)  # in-memory sources: checked by `fewstep validate`
            return prepare_cache(dataset, teacher, cache_dir())
        if teacher.vae is not None and dataset.has_images:
            fingerprint = json.dumps([str(teacher.source), cfg.model_dump(mode="json"), update], sort_keys=True)
            # the user cache, never next to the data (an input, possibly read-only or inside a package)
            cache = cache_dir() / "latents" / cache_key(fingerprint)
            dataset = encode_latents(dataset, teacher.encode, cache_path=cache / "latents.safetensors",
                                     fingerprint=fingerprint)
        return dataset

    # ------------------------------------------------------------------ periodic work
    @torch.no_grad()
    def validate(self) -> dict[str, torch.Tensor]:
        """Sample the validation grid (student at each step count, teacher once) and hand it to observers."""
        from fewstep.sampling import generate, teacher_rows

        vcfg = self.config.validation
        noise, cond = self.validation_inputs()
        if self._teacher_rows is None:
            self._teacher_rows = (teacher_rows(self.nets.teacher, noise, cond, vcfg, self.config.teacher.guidance)
                                  if vcfg.teacher_steps else {})
        images = dict(self._teacher_rows)
        for k in vcfg.steps:
            images[f"student {k} step" + ("s" if k > 1 else "")] = generate(
                self.pm.hook, self.ctx, self.nets, noise, cond, k, seed=self.config.train.seed + k)
        self.pm.hook.fewstep_on_validation(ctx=self.ctx, step=self.step_info(), images=images, cond=cond)
        return images

    def validation_inputs(self) -> tuple[torch.Tensor, Cond | None]:
        n = self.config.validation.num_images
        g = torch.Generator().manual_seed(mix_seed(self.config.train.seed, 0xF1E1D))
        noise = torch.randn((n, *self.nets.teacher.sample_shape), generator=g).to(self.ctx.device)
        teacher = self.nets.teacher
        if teacher.net.image_channels:  # the condition images (and labels) of the stream's first n samples
            from fewstep.imagecond import require_image_condition

            s = self.stream.read(0, n, 0, n)
            x = s.x.to(self.ctx.device) if s.x is not None else None
            if x is not None and not s.latent and teacher.vae is not None:
                x = teacher.encode(x)
            cond, _ = self.make_cond(s.labels, s.prompts, n, samples=s)
            z = torch.randn(x.shape if x is not None else (1,), generator=g).to(self.ctx.device)
            return noise, require_image_condition(teacher).attach(x, cond, None, z)[0]
        if teacher.conditioning == "class":
            return noise, Cond(labels=torch.arange(n, device=self.ctx.device) % teacher.num_classes)
        if teacher.conditioning == "text":
            if (given := self.config.validation.prompts) is not None:
                prompts = tuple(given[i % len(given)] for i in range(n))
            else:
                _, _, prompts = self.dataset.get(torch.arange(n) % len(self.dataset))
            return noise, teacher.encode_prompts(list(prompts) if prompts else [""] * n)
        return noise, None

    def step_boundary(self) -> None:
        """Checkpoints due now (by images or by time) and a stop requested by a signal or the wall-time budget,
        decided from flags that every rank agreed on after this step (:meth:`agreed_flags`)."""
        stop, timed, over = self.agreed_flags()
        saved = None
        if self._crossed(self.config.train.checkpoint_every_nimg) or (timed and self.state.nimg < self.total_nimg):
            saved = self.save_checkpoint()
        if stop or over:
            reason = (self.signals.received or "a signal to another process") if stop else \
                f"train.max_wall_s={self.config.train.max_wall_s:g}"
            raise RunStopped(reason, self.state.nimg, saved or self.save_checkpoint())

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint, refusing one with non-finite weights (it would rotate a good one out), after reading
        the step log (a non-finite step under ``train.nonfinite: stop`` stops the run here instead)."""
        self.read_log()
        named = {f"{n}.{k}": v for n in self.nets.names() for k, v in unwrap(self.nets.get(n)).state_dict().items()}
        if bad := nonfinite_tensors(named):
            raise NonFiniteError(f"not writing a checkpoint at {self.state.nimg} images: {len(bad)} tensor(s) hold "
                                 f"NaN or inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the earlier "
                                 f"checkpoints in {self.run_dir / 'checkpoints'} are kept. Fix: lower optimizer.lr or "
                                 "set optimizer.max_grad_norm, then --resume --allow-config-change")
        state = {"step": self.state.step, "nimg": self.state.nimg, "skipped": self.state.skipped}
        self._t_ckpt = time.perf_counter()
        return self.pm.hook.fewstep_save_checkpoint(ctx=self.ctx, accelerator=self.accelerator, nets=self.nets, state=state)

    def finish(self) -> None:
        hook = self.pm.hook
        self._t_end = time.perf_counter()  # training wall time excludes the final sampling and evaluation
        self._peak_mb = peak_memory_mb(self.ctx.device)  # so does the peak memory (Inception, 1000-sample rows)
        self.save_checkpoint()
        self.gather_sharded()
        self.validate()
        if self.config.eval.reference is not None and self.ctx.is_main:
            self.write_summary(evaluation=self.evaluate())
        if self.config.export.enabled:
            from fewstep.export import export_run

            export_run(hook, self.ctx, self.nets, self.run_dir / "export")
        hook.fewstep_on_train_end(ctx=self.ctx, nets=self.nets)
        if self.ctx.is_main:
            self.write_summary()
        self.accelerator.wait_for_everyone()

    def gather_sharded(self) -> None:
        """After training under FSDP2 or ZeRO-3: every sharded network becomes a whole copy on every process (its
        full state dict, gathered, in the skeleton kept at setup), so the final samples, the evaluation on the main
        process and the export read plain modules as under DDP. The optimizers are dropped first to make room."""
        if not getattr(self, "_skeletons", None):
            return
        from fewstep.distributed import materialize

        self.optimizers.clear()
        whole = {}
        for name, skeleton in self._skeletons.items():
            net = self.nets.get(name)
            if self.plan.engine == "zero3":  # DeepSpeed's partitions, gathered for the copy (unverified)
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
                    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
            whole[name] = materialize(skeleton, state, self.ctx.device)
        self.nets, self.wrapped, self._skeletons = self.nets.replace(**whole), {}, {}

    def evaluate(self, on_row: Callable[[str, dict], None] | None = None, **overrides: Any) -> dict[str, Any]:
        """FID / precision / recall / samples/s of the student at ``eval.steps`` and of the teacher
        (fewstep.evaluation.evaluate_run) with the recipe's ``eval`` section, fields overridden by keyword;
        ``on_row(label, metrics)`` as each row is done."""
        from fewstep.evaluation import FeatureExtractor, evaluate_run

        cfg = self.config.eval.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        extractor = FeatureExtractor(cfg.features, device=self.ctx.device)
        return evaluate_run(self, self.pm.hook, extractor, steps=cfg.steps, num=cfg.num,
                            teacher_steps=cfg.teacher_steps, reference=cfg.reference or "data",
                            batch_size=cfg.batch, seed=cfg.seed, on_row=on_row)

    def write_summary(self, evaluation: dict[str, Any] | None = None, coupling: dict[str, Any] | None = None) -> Path:
        """Merge this run's numbers (an evaluation under "eval", coupling preservation under "coupling") into
        RUN/summary.json. Training numbers (wall time, images/s, peak memory) are written only by a run that
        trained."""
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        seen = self.state.nimg - self._nimg0
        if seen > 0:
            wall = (self._t_end or time.perf_counter()) - self._t0
            summary.update({"method": self.config.method.name, "nimg": self.state.nimg, "steps": self.state.step,
                            "wall_time_s": round(wall, 2), "images_per_s": round(seen / max(wall, 1e-9), 2),
                            "peak_memory_mb": round(self._peak_mb or peak_memory_mb(self.ctx.device), 1)})
        if evaluation is not None:
            summary["eval"] = evaluation
        if coupling is not None:
            summary["coupling"] = coupling
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)
        return path


def seed_global(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` (the global generators: dropout and other draws inside the networks). A CPU
    run seeds the CPU generator alone: ``torch.manual_seed`` also queues seeds for every accelerator backend that
    is not initialised, recording a formatted stack trace for each (CUDA, XPU, MTIA), 0.5 ms a call here."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def check_teacher_finite(teacher: Any) -> None:
    """Refuse a teacher whose weights hold NaN or inf: every target it gives would be non-finite."""
    named = {f"{label}.{k}": v for label in ("net", "weak", "vae", "text_encoder")
             if isinstance(m := getattr(teacher, label, None), nn.Module) for k, v in m.state_dict().items()}
    if bad := nonfinite_tensors(named):
        raise TrainingError(f"teacher {getattr(teacher, 'source', '')}: {len(bad)} weight tensor(s) hold NaN or inf "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the file is corrupt or came "
                            "from a diverged run: point teacher.pretrained at a finite checkpoint")


def make_optimizer(group: OptimizerGroup, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The group's optimizer, with torch's fused kernels where torch has them for it (Adam, AdamW, SGD on CPU,
    CUDA and others): the non-finite guard hands them its skip flag on the device (fewstep.steplog.gated_step)."""
    if group.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": group.betas[0]}
    else:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[group.optimizer]
        kwargs = {"betas": group.betas, "eps": group.eps}
    kwargs.update(lr=group.lr, weight_decay=group.weight_decay)
    if cls is not torch.optim.RAdam and fused_supported(params):  # RAdam has no fused kernel
        kwargs["fused"] = True
    return cls(params, **kwargs)


def fused_supported(params: list[nn.Parameter]) -> bool:
    """Whether torch has fused optimizer kernels for every one of ``params`` (device and dtype), by torch's own
    check, which would otherwise fail at the first step (private API: absent, or too old for CPU, in torch
    < 2.4, where the optimizer runs unfused and the skip flag is read on the host)."""
    from torch.optim import optimizer

    check = getattr(optimizer, "_device_dtype_check_for_fused", None)
    if check is None or not params or tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        return False
    if any(hasattr(p, "placements") for p in params):  # FSDP2's DTensors: torch 2.13 has no fused SGD rule for them
        return False
    try:
        for p in params:
            check(p)
    except RuntimeError:
        return False
    return True


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
