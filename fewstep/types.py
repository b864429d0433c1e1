"""Payloads passed through the hooks (DESIGN.md §4).

Everything here is a frozen dataclass: a hook receives a payload, reads it, and returns a new value;
it never mutates what the core handed it. The only mutable objects reachable from a payload are
networks (their parameters change when an optimizer steps) and the dictionary of extra networks,
which the core fills once before training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pydantic import BaseModel

    from fewstep.config import OptimizerConfig
    from fewstep.teacher import Teacher

__all__ = [
    "Batch",
    "Cond",
    "LossOutput",
    "Nets",
    "OptimizerGroup",
    "Phase",
    "RunContext",
    "StepInfo",
]


@dataclass(frozen=True)
class Cond:
    """Conditioning for one batch; every field is optional and batch-first.

    labels: (B,) int64 class ids; the null (unconditional) class is ``num_classes``.
    embeddings: (B, L, D) text-encoder hidden states (``encoder_hidden_states`` in diffusers).
    pooled: (B, D) pooled text embedding, for backbones that take one.
    attention_mask: (B, L) int64 text mask (1: token, 0: padding) for backbones that read one (PixArt, Sana).
    added: (B, K) float size conditions: SDXL's time ids (original h, w, crop top, left, target h, w;
        K = 6), PixArt-alpha's resolution and aspect ratio (h, w, h/w; K = 3).
    guidance: (B,) float guidance scale fed to a guidance-distilled backbone's own guidance embedding
        (Flux ``guidance_embeds``); None: the backbone's default (see ``Backbone.embedded_guidance``).
    prompts: the raw prompts, kept for logging and model cards; never fed to a network.
    image: (B, C_img, H, W) float condition image, read by a backbone with ``image_channels`` as extra input
        channels next to x (``Backbone.add_image_channels``): a LowDiff stage's up-sampled previous output, a
        super-resolution teacher's low-resolution input. The trainer makes it from the batch's data with the
        teacher's ``image_condition`` (fewstep.imagecond); samplers pass it in. It is part of the input, not of
        the guided condition: :meth:`where` keeps it when ``other`` (a null condition) has none.
    The fields a family fills are listed in :mod:`fewstep.families`.
    """

    labels: Tensor | None = None
    embeddings: Tensor | None = None
    pooled: Tensor | None = None
    prompts: tuple[str, ...] | None = None
    attention_mask: Tensor | None = None
    added: Tensor | None = None
    guidance: Tensor | None = None
    image: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        names = ("labels", "embeddings", "pooled", "attention_mask", "added", "guidance", "image")
        return {k: v for k in names if (v := getattr(self, k)) is not None}

    @property
    def is_empty(self) -> bool:
        return not self._tensors()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        """Move tensors to ``device``; floating tensors are also cast to ``dtype`` when given."""
        moved = {}
        for k, v in self._tensors().items():
            moved[k] = v.to(device, dtype) if (dtype is not None and v.is_floating_point()) else v.to(device)
        return dataclasses.replace(self, **moved)

    def index(self, idx: Tensor | slice) -> Cond:
        """Select samples along the batch dimension."""
        out = {k: v[idx] for k, v in self._tensors().items()}
        if self.prompts is not None:
            rows = range(len(self.prompts))[idx] if isinstance(idx, slice) else idx.tolist()
            out["prompts"] = tuple(self.prompts[i] for i in rows)
        return dataclasses.replace(self, **out)

    def repeat(self, n: int) -> Cond:
        """Repeat every sample ``n`` times (sample-major), e.g. for several noises per condition."""
        out = {k: v.repeat_interleave(n, dim=0) for k, v in self._tensors().items()}
        if self.prompts is not None:
            out["prompts"] = tuple(p for p in self.prompts for _ in range(n))
        return dataclasses.replace(self, **out)

    def where(self, mask: Tensor, other: Cond) -> Cond:
        """Per sample, ``other`` where ``mask`` (B,) is True, else self (label dropout for CFG training).
        The condition image is kept where ``other`` has none (a null condition drops labels or text, never the
        image the network is conditioned on)."""
        out = {}
        for k, v in self._tensors().items():
            o = getattr(other, k)
            if o is None and k == "image":
                continue
            if o is None:
                raise ValueError(f"Cond.where: this condition has {k!r} but the other one has none; build both "
                                 "with the same fields (Teacher.null_cond gives the null condition)")
            m = mask.view(-1, *([1] * (v.ndim - 1)))
            out[k] = torch.where(m, o.to(v.device), v)
        return dataclasses.replace(self, **out)

    def with_image(self, image: Tensor | None) -> Cond:
        """This condition with ``image`` (B, C_img, H, W) as its condition image (None: none)."""
        return dataclasses.replace(self, image=image)

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate along the batch dimension (used to batch the cond and uncond passes of CFG)."""
        first = conds[0]
        for c in conds[1:]:
            missing = [k for k in first._tensors() if getattr(c, k) is None]
            if missing or (first.image is None) != (c.image is None):
                raise ValueError(f"Cond.cat: conditions with different fields ({sorted(first._tensors())} vs "
                                 f"{sorted(c._tensors())}); give every part the same fields (the null condition of "
                                 "an image-conditioned model carries the image too: Cond.with_image)")
        out: dict[str, Any] = {k: torch.cat([getattr(c, k) for c in conds]) for k in first._tensors()}
        if first.prompts is not None:
            out["prompts"] = tuple(p for c in conds for p in (c.prompts or ()))
        return Cond(**out)


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the loss hook sees it, already on the run's device.

    x0: (B, C, H, W) clean samples in model space (VAE latents for a latent teacher), or None for
        data-free methods. cond / uncond: the condition and its null counterpart (uncond is None
        when the teacher is unconditional). pairs: (noise, x0) couplings from the teacher's ODE, both
        (B, C, H, W) in model space, when the recipe names a pair store (``data.pairs``), else None;
        pair_cond: the condition each pair was generated with (drawn independently of ``cond``).
    """

    x0: Tensor | None
    cond: Cond
    uncond: Cond | None = None
    pairs: tuple[Tensor, Tensor] | None = None
    pair_cond: Cond | None = None

    @property
    def size(self) -> int:
        if self.x0 is not None:
            return self.x0.shape[0]
        if self.pairs is not None:
            return self.pairs[0].shape[0]
        tensors = self.cond._tensors()
        if not tensors:
            raise ValueError("Batch has neither data nor conditioning, so its size is unknown")
        return next(iter(tensors.values())).shape[0]


@dataclass(frozen=True)
class StepInfo:
    """Where training stands, and the random numbers for this micro-batch.

    Curricula are pure functions of these fields (STYLE.md rule 5). Random draws go through
    :meth:`randn` / :meth:`rand` / :meth:`randint` / :meth:`draw`: they draw for the whole *global*
    batch of the step from a generator seeded by (seed, images seen, group) and return the rows of
    this process's micro-batch (``offset`` .. ``offset + local_batch``). Sample j of the global batch
    therefore gets the same numbers whatever the number of processes or accumulation rounds, and a
    resumed run replays exactly.

    ``device_generator`` (the trainer sets one on GPUs, seeded like ``generator``): randn / rand / randint
    draw on the device from it, with no host-to-device copy; ``draw`` always uses the CPU ``generator``.
    """

    step: int
    nimg: int
    total_nimg: int
    phase: str
    phase_progress: float
    progress: float
    generator: torch.Generator
    rank: int = 0
    world_size: int = 1
    local_batch: int = 1
    global_batch: int = 1
    offset: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_generator: torch.Generator | None = None

    def _global(self, draw: Tensor) -> Tensor:
        return draw[self.offset : self.offset + self.local_batch].to(self.device)

    def _gen(self) -> dict[str, Any]:
        g = self.device_generator or self.generator
        return {"generator": g, "device": g.device}

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B_local, *shape) standard normal draws."""
        return self._global(torch.randn((self.global_batch, *shape), dtype=dtype, **self._gen()))

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B_local, *shape) uniform draws in [0, 1)."""
        return self._global(torch.rand((self.global_batch, *shape), dtype=dtype, **self._gen()))

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """(B_local, *shape) integers in [low, high)."""
        return self._global(torch.randint(low, high, (self.global_batch, *shape), **self._gen()))

    def draw(self, fn: Callable[[int, torch.Generator], Tensor]) -> Tensor:
        """Any other draw: ``fn(global_batch, generator)`` returns (global_batch, ...); this micro-batch's rows."""
        return self._global(fn(self.global_batch, self.generator))

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like the local batch ``x``: (B_local, ...)."""
        return self.randn(*x.shape[1:], dtype=torch.float32).to(x.dtype)


@dataclass(frozen=True)
class LossOutput:
    """What ``fewstep_loss`` returns.

    loss: (B,) per-sample losses; the trainer owns reduction, accumulation and backward.
    terms: scalar log values (detached), averaged over micro-batches and logged as ``<group>/<name>``.
    images: optional (B, C, H, W) tensors in data space for the validation grid.
    """

    loss: Tensor
    terms: Mapping[str, Tensor | float] = field(default_factory=dict)
    images: Mapping[str, Tensor] = field(default_factory=dict)


OptimizerName = Literal["adam", "adamw", "radam", "sgd"]


@dataclass(frozen=True)
class OptimizerGroup:
    """A set of networks stepped together by one optimizer.

    modules: names of networks in :class:`Nets` (``"student"`` or a key of ``Nets.extra``).
    every_n_steps: the group steps on trainer steps where ``step % every_n_steps == 0``; with a
        student at 5 and a fake-score group at 1, the fake score steps five times per student step.
    max_grad_norm: clip the group's gradient norm to this value (None: no clipping).
    warmup_nimg: linear learning-rate warm-up over this many images seen.
    decay_nimg: EDM2's inverse-square-root decay, lr / sqrt(max(nimg / decay_nimg, 1)) (None: constant).
    lr_scale: a further learning-rate factor, a pure function of :class:`StepInfo` (e.g. progressive
        distillation's linear annealing to 0 within each round, ``lambda s: 1 - s.phase_progress``).
    """

    name: str
    modules: tuple[str, ...]
    lr: float
    optimizer: OptimizerName = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    every_n_steps: int = 1
    max_grad_norm: float | None = None
    warmup_nimg: int = 0
    decay_nimg: int | None = None
    lr_scale: Callable[[StepInfo], float] | None = None

    @classmethod
    def from_recipe(cls, optimizer: OptimizerConfig, name: str = "student", modules: tuple[str, ...] = ("student",),
                    **changes: Any) -> OptimizerGroup:
        """A group with a recipe's ``optimizer`` section's settings (fields replaced by ``changes``)."""
        o = optimizer
        fields = dict(lr=o.lr, optimizer=o.name, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                      max_grad_norm=o.max_grad_norm, warmup_nimg=o.warmup_nimg, decay_nimg=o.decay_nimg)
        return cls(name, modules, **{**fields, **changes})

    def lr_at(self, nimg: int) -> float:
        """The rate of a step that ends at ``nimg`` images seen: ``lr`` times the linear warm-up, over EDM2's
        inverse-square-root decay (before ``lr_scale``, which the trainer applies)."""
        lr = self.lr
        if self.warmup_nimg:
            lr *= min(1.0, nimg / self.warmup_nimg)
        if self.decay_nimg:
            lr /= math.sqrt(max(nimg / self.decay_nimg, 1.0))
        return lr

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError(f"optimizer group {self.name!r} names no modules")
        if self.every_n_steps < 1:
            raise ValueError(f"optimizer group {self.name!r}: every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.lr <= 0:
            raise ValueError(f"optimizer group {self.name!r}: lr must be > 0, got {self.lr}")

    def due(self, step: int) -> bool:
        """Whether this group steps on trainer step ``step`` (0-based)."""
        return step % self.every_n_steps == 0


@dataclass(frozen=True)
class Phase:
    """A stretch of training in which only ``groups`` step.

    duration_nimg: images seen in this phase; None means "until the end of training" and is only
    allowed for the last phase.
    """

    name: str
    groups: tuple[str, ...]
    duration_nimg: int | None = None


@dataclass(frozen=True)
class Nets:
    """All networks of a run.

    teacher: the frozen teacher (never wrapped by accelerate, never given to an optimizer).
    student: the network being distilled (trainable).
    extra: additional networks from ``fewstep_extra_networks`` (target, fake_score, disc, ema...).
    Networks are looked up by name with :meth:`get`; optimizer groups refer to the same names.
    """

    teacher: Teacher
    student: nn.Module
    extra: dict[str, nn.Module] = field(default_factory=dict)

    def get(self, name: str) -> nn.Module:
        if name == "student":
            return self.student
        try:
            return self.extra[name]
        except KeyError:
            known = ", ".join(["student", *self.extra])
            raise KeyError(f"no network named {name!r}; networks of this run: {known}") from None

    def names(self) -> list[str]:
        return ["student", *self.extra]

    @property
    def ema(self) -> nn.Module | None:
        """The evaluation EMA of the student, when the ``ema`` plugin is active."""
        return self.extra.get("ema")

    def replace(self, **networks: nn.Module) -> Nets:
        """A view with some networks swapped (the trainer uses it to hand wrapped modules to a loss)."""
        student = networks.pop("student", self.student)
        return Nets(self.teacher, student, {**self.extra, **networks})


@dataclass(frozen=True)
class RunContext:
    """What a plugin knows about the run.

    method: the plugin's own validated sub-config (its pydantic model); config: the whole run config.
    dtype: the compute dtype (bf16/fp16 under mixed precision, else fp32); the frozen teacher lives in it.
    global_batch: images per optimizer step over all processes and accumulation rounds; local_batch: the
    images of one micro-batch on this process (global_batch / accumulation / world_size).
    """

    method: BaseModel
    config: Any
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    seed: int
    rank: int = 0
    world_size: int = 1
    global_batch: int = 1
    local_batch: int = 1
    is_main: bool = True
