"""Every hook a fewstep plugin can implement: the single source of truth (DESIGN.md §4).

Kinds:
- *collect*: every active plugin's result is gathered into a list.
- *first* (``firstresult=True``): the first non-None result wins. Core defaults are registered
  ``trylast``, so a method plugin's implementation always takes precedence.
- *observe*: every implementation runs; return values are ignored.

An implementation may accept any subset of a hook's arguments (pluggy passes arguments by name),
so specs can grow. Arguments are never renamed or removed. Compared with DESIGN.md §4, several
hooks also receive ``ctx`` (the run context): plugins stay stateless modules and read their own
validated sub-config from ``ctx.method`` instead of keeping globals.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import Tensor, nn

    from fewstep.editing import ConsistencyDenoiser
    from fewstep.export import StockExport, StockSampler
    from fewstep.teacher import Teacher
    from fewstep.types import Batch, Cond, LossOutput, Nets, OptimizerGroup, Phase, RunContext, StepInfo

PROJECT = "fewstep"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fewstep_method_config() -> list[tuple[str, type[BaseModel]]] | tuple[str, type[BaseModel]]:
    """Collect. Declare the method names this plugin provides and the pydantic model of each.

    Return one ``(name, Model)`` pair or a list of them. ``Model`` validates the recipe's ``method:``
    section (it must accept the key ``name``). Called on every installed plugin at discovery, also
    for plugins not active in the run, so keep it import-light.
    """


@hookspec
def fewstep_configure(config: Any) -> None:
    """Observe. Check cross-field constraints of the whole run config; raise ``ValueError`` with a
    message naming the fields and the fix. Runs before anything is built."""


@hookspec(firstresult=True)
def fewstep_build_teacher(ctx: RunContext) -> Teacher | None:
    """First. Load and freeze the teacher (eval mode, no gradients, compute dtype).
    The core default loads ``config.teacher.pretrained`` with :func:`fewstep.teacher.load_teacher`."""


@hookspec(firstresult=True)
def fewstep_build_student(ctx: RunContext, teacher: Teacher) -> nn.Module | None:
    """First. Return the trainable student network. Core default: a copy of the teacher's backbone in
    fp32 with gradients on; a method that needs extra scalar inputs (target time s, guidance w) adds
    them with ``Backbone.add_scalar_inputs`` so the student equals its teacher at step 0."""


@hookspec
def fewstep_extra_networks(ctx: RunContext, teacher: Teacher, student: nn.Module) -> dict[str, nn.Module] | None:
    """Collect. Return additional networks by name (``target``, ``fake_score``, ``disc``, ``ema``...).

    Names must be unique across plugins. Networks named in an optimizer group are trained; the rest
    (targets, EMAs) are moved to the device, checkpointed and exported but never given gradients.
    """


@hookspec(firstresult=True)
def fewstep_optimizer_groups(ctx: RunContext, nets: Nets) -> list[OptimizerGroup] | None:
    """First. Declare optimizer groups as data. Core default: one group ``student`` from the config's
    ``optimizer`` section."""


@hookspec(firstresult=True)
def fewstep_phases(ctx: RunContext, groups: list[OptimizerGroup]) -> list[Phase] | None:
    """First. Declare the phases of training as data, given the declared optimizer ``groups``. Core
    default: a single phase ``train`` in which every group steps, lasting ``train.total_nimg``. The durations must add up to at most
    ``train.total_nimg``; only the last phase may have ``duration_nimg=None`` (until the end)."""


@hookspec
def fewstep_on_train_start(ctx: RunContext, nets: Nets, step: StepInfo) -> None:
    """Observe. Called once after everything is built and any checkpoint restored."""


@hookspec(firstresult=True)
def fewstep_loss(ctx: RunContext, group: OptimizerGroup, batch: Batch, nets: Nets, step: StepInfo) -> LossOutput | None:
    """First, required. Compute the loss of optimizer group ``group`` on one micro-batch.

    Only compute: no backward, no optimizer, no logging, no files. Return per-sample losses ``(B,)``;
    the trainer reduces, scales for accumulation and back-propagates. Networks of ``group`` arrive
    ready to train (wrapped for multi-process training); every other trainable network arrives
    unwrapped with gradients off, so nothing leaks into groups that are not due. Draw random numbers
    with ``step.randn`` / ``step.rand`` / ``step.randint`` so results do not depend on world size.
    """


@hookspec
def fewstep_after_optimizer_step(ctx: RunContext, group: OptimizerGroup, nets: Nets, step: StepInfo) -> None:
    """Observe. Called after ``group``'s optimizer stepped (target-network EMA, evaluation EMA...)."""


@hookspec
def fewstep_on_step_end(ctx: RunContext, step: StepInfo, logs: dict[str, float]) -> None:
    """Observe. Called once per trainer step (main and other ranks). ``logs``: at the step that closes a logging
    window (``train.log_every_nimg``, and the last step), each logged term's mean over the window's applied steps
    and over processes (``GROUP/skipped``: steps skipped as non-finite); empty at the other steps, whose values
    are still on the device (docs/SPEED.md, "GPU-clean step")."""


@hookspec
def fewstep_on_phase_end(ctx: RunContext, phase: Phase, nets: Nets) -> None:
    """Observe. Called when a phase ends (e.g. hand the student over as the next round's teacher)."""


@hookspec(firstresult=True)
def fewstep_sample(
    ctx: RunContext, nets: Nets, noise: Tensor, cond: Cond | None, num_steps: int, generator: Any
) -> Tensor | None:
    """First. Generate samples with the student in ``num_steps`` network evaluations.

    noise: (B, C, H, W) standard normal in model space. Returns (B, C, H, W) in model space (the core
    decodes latents). Uses ``nets.ema`` when present. ``generator`` seeds any fresh noise the
    sampler injects (a ``torch.Generator``)."""


@hookspec
def fewstep_on_validation(ctx: RunContext, step: StepInfo, images: dict[str, Tensor], cond: Cond | None) -> None:
    """Observe. Validation samples in data space, keyed by a row label ("student 1 step", "teacher")."""


@hookspec
def fewstep_sampling_networks(ctx: RunContext) -> list[str] | None:
    """Collect. Names of the extra networks (keys of ``Nets.extra``) that ``fewstep_sample`` needs besides
    the student or its EMA (e.g. the K students of MSD, CAF's velocity network, SCT's weak snapshot).
    The export writes them next to the student, and a loaded export restores them, so the exported
    pipeline runs the plugin's own sampler. Each must be a :class:`fewstep.backbones.Backbone`."""


@hookspec(firstresult=True)
def fewstep_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None) -> ConsistencyDenoiser | None:
    """First. The student's consistency function for zero-shot editing (CM Algorithm 4, ``fewstep.editing``):
    a :class:`fewstep.editing.ConsistencyDenoiser` whose ``f(x, sigma)`` maps a sigma-space sample at any level
    in [sigma_min, sigma_max] to its clean estimate (model space, the EMA student when there is one), with the
    re-noising floor of the method's multistep sampler. None: the method does not support editing."""


@hookspec(firstresult=True)
def fewstep_score_denoiser(ctx: RunContext, nets: Nets, cond: Cond | None) -> Any:
    """First. The student's denoiser D(x, sigma) (sigma space, differentiable in x) as a score model,
    score = (D - x) / sigma^2, for the probability-flow likelihood (``fewstep.likelihood``): a callable
    (x (B,C,H,W), sigma (B,)) -> (B,C,H,W). None: the student is not a score model (``fewstep likelihood``
    then uses only teachers)."""


@hookspec(firstresult=True)
def fewstep_stock_sampler(ctx: RunContext, nets: Nets, num_steps: int) -> StockSampler | None:
    """First. How a stock diffusers scheduler reproduces this method's ``num_steps``-step ``fewstep_sample`` with
    the student as a plain diffusers model: a :class:`fewstep.export.StockSampler` (scheduler class and config,
    the pipeline's ``timesteps`` / ``sigmas``, constant scalar inputs to fold into the student), or None when no
    stock scheduler does (then the export is fewstep's FewStepPipeline and its model card says why). Exact up
    to float rounding (a mapping that neglects a term documents its bound, e.g. cm's BOUNDARY_TOLERANCE);
    ``fewstep.export.renoise_sampler`` covers the common "predict x0, re-noise" sampler. Raise ``ValueError``
    for a step count the method cannot sample."""


@hookspec(firstresult=True)
def fewstep_export(ctx: RunContext, nets: Nets, out_dir: Path, sampling_networks: list[str],
                   stock: StockExport | None, reason: str) -> Path | None:
    """First. Write the student as a folder that ``diffusers.DiffusionPipeline.from_pretrained`` loads and
    samples from; return its path. ``sampling_networks``: what ``fewstep_sampling_networks`` collected.
    ``stock``: the family's stock pipeline and scheduler when ``fewstep_stock_sampler`` maps the sampler to
    one (``fewstep.export.plan_stock_export``), else None and ``reason`` says why. Core default:
    ``fewstep.export.write_export`` (the stock pipeline, or a FewStepPipeline folder)."""


@hookspec(firstresult=True)
def fewstep_save_checkpoint(ctx: RunContext, accelerator: Any, nets: Nets, state: dict[str, Any]) -> Path | None:
    """First. Write a checkpoint of the run (weights, optimizer and RNG state, trainer ``state``)."""


@hookspec(firstresult=True)
def fewstep_load_checkpoint(ctx: RunContext, accelerator: Any, nets: Nets, checkpoint: Path | None) -> dict[str, Any] | None:
    """First. Restore ``checkpoint`` (a checkpoint folder; None: the latest of ``ctx.run_dir``) in place
    and return the trainer state that was saved with it, or None when there is none."""


@hookspec
def fewstep_on_train_end(ctx: RunContext, nets: Nets) -> None:
    """Observe. Called once when training finishes normally."""
