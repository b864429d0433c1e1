"""The hot path's bookkeeping without host syncs (issue 15, docs/SPEED.md "GPU-clean step"): the non-finite
guard decided on the device, optimizer steps gated by its flag, and log values summed on the device and read
back in one transfer per logging window (``train.log_every_nimg``) or checkpoint (docs/RELIABILITY.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def grad_norm(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of all ``tensors`` together, on their device (no host sync): one ``_foreach_norm`` and a
    stack. (``torch.nn.utils.get_total_norm`` calls ``vector_norm`` once per tensor on devices without foreach
    kernels, the CPU among them: 183 calls a step on the digits UNet.)"""
    if not tensors:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
    # FSDP2: the gradients are sharded DTensors and so is their norm; the whole norm takes one all-reduce
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def step_gated(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (or the one an accelerate wrapper holds) runs torch's fused kernels, which take a
    ``found_inf`` flag and leave parameters and state (moments, step count) untouched where it is 1. The
    param groups decide, not the defaults: a checkpoint of an unfused optimizer overwrites them on load."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if getattr(optimizer, "scaler", None) is not None:  # fp16: accelerate's grad scaler hands over its own flag
        return False
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):  # e.g. DeepSpeed's wrapper
        return False
    return bool(inner.param_groups) and all(g.get("fused") for g in inner.param_groups)


def gated_step(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()`` unless the device flag ``skip`` (a bool scalar) is set, without reading it on the
    host where the optimizer is fused (:func:`step_gated`); other optimizers (RAdam, or a device without fused
    kernels) read it: one host sync per optimizer step."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not step_gated(optimizer):
        if not bool(skip):  # host sync: no fused kernel to hand the flag to
            optimizer.step()
        return
    # torch's fused Adam/AdamW/SGD read these attributes (the way torch.amp.GradScaler hands them over)
    inner.found_inf, inner.grad_scale = skip.float(), None
    try:
        optimizer.step()
    finally:
        del inner.found_inf, inner.grad_scale


@dataclass
class _Entry:
    """One group's values with one set of keys, summed on the device since the last read."""

    keys: tuple[str, ...]
    sums: Tensor  # (K,) values of applied steps
    bad_sums: Tensor  # (K,) values of non-finite steps (for the message: nan / inf)
    kept: Tensor  # () applied steps
    bad: Tensor  # () non-finite steps
    first_bad: Tensor  # () the first non-finite step's index, -1 if none
    steps: int = 0  # steps added (host)


@dataclass
class Read:
    """What one read found: the logging window's sums are kept by :class:`StepLog`; these are the news."""

    nonfinite: int  # non-finite steps since the previous read
    first: tuple[str, int, dict[str, float]] | None  # (group, step, values) of the first of them


@dataclass
class StepLog:
    """Log values and non-finite flags of the optimizer steps, kept on ``device`` until :meth:`read`.

    ``budget``: how many non-finite steps may still be skipped (``train.max_nonfinite_skips`` minus those
    skipped before; 0 under ``train.nonfinite: stop``). Past it the log *halts*: every later step is skipped
    too, on the device, until the host reads the log and stops the run, so the weights stay those from before
    the step that broke the budget. ``reduce`` sums a tensor over processes (the identity in one process)."""

    device: torch.device
    budget: int
    reduce: Callable[[Tensor], Tensor]
    world_size: int = 1
    _entries: dict[tuple[str, tuple[str, ...]], _Entry] = field(default_factory=dict)
    _window: dict[str, list[float]] = field(default_factory=dict)  # key -> [sum, count] since the window opened
    _skipped: dict[str, int] = field(default_factory=dict)  # group -> skipped steps in the window
    _bad_total: Tensor = field(init=False)  # () non-finite steps since the last read
    _halted: Tensor = field(init=False)  # () bool: the budget is spent, every step is skipped

    def __post_init__(self) -> None:
        self._bad_total = torch.zeros((), device=self.device)
        self._halted = torch.zeros((), dtype=torch.bool, device=self.device)

    def guard(self, loss: Tensor, norm: Tensor | None) -> tuple[Tensor, Tensor]:
        """(non-finite, skip) device flags of a step with this loss and gradient norm, equal on every process:
        skip = non-finite or halted. Call :meth:`add` with them after the step."""
        finite = torch.isfinite(loss) if norm is None else torch.isfinite(loss) & torch.isfinite(norm)
        bad = ~finite
        if self.world_size > 1:  # a device all-reduce, no host sync: every rank skips the same steps
            bad = self.reduce(bad.float()) > 0
        return bad, bad | self._halted

    def add(self, group: str, step: int, values: dict[str, Tensor], host: dict[str, float], bad: Tensor,
            skip: Tensor) -> None:
        """Record one optimizer step of ``group``: device scalars ``values`` (summed where the step was applied)
        and Python floats ``host`` (counted whether or not it was: they never reached the device)."""
        keys = tuple(sorted(values))
        entry = self._entries.get((group, keys))
        if entry is None:
            zeros = torch.zeros(len(keys), device=self.device)
            scalar = torch.zeros((), device=self.device)
            entry = self._entries[(group, keys)] = _Entry(keys, zeros, zeros.clone(), scalar, scalar.clone(),
                                                          scalar - 1)
        vec = torch.stack([values[k].float().to(self.device) for k in keys])
        zero = torch.zeros((), device=self.device)
        entry.sums += torch.where(skip, zero, vec)
        entry.bad_sums += torch.where(bad, vec, zero)
        entry.kept += ~skip
        entry.bad += bad
        entry.first_bad = torch.where((entry.first_bad < 0) & bad, step, entry.first_bad)
        entry.steps += 1
        self._bad_total += bad
        self._halted = self._bad_total > self.budget
        for k, v in host.items():
            acc = self._window.setdefault(f"{group}/{k}", [0.0, 0])
            acc[0], acc[1] = acc[0] + v, acc[1] + 1

    def read(self) -> Read:
        """Move the device sums into the window (one reduce and one host sync) and report non-finite steps.
        Lowers the budget by the non-finite steps found."""
        if not self._entries:
            return Read(0, None)
        entries = list(self._entries.values())
        vec = torch.cat([torch.cat([e.sums, e.bad_sums, torch.stack([e.kept, e.bad, e.first_bad])]) for e in entries])
        if self.world_size > 1:
            vec = self.reduce(vec)
        values = [v / self.world_size for v in vec.tolist()]  # host sync
        nonfinite, first, at = 0, None, 0
        for (group, keys), e in zip(self._entries, entries):
            k = len(keys)
            sums, bad_sums, (kept, bad, first_bad) = values[at:at + k], values[at + k:at + 2 * k], values[at + 2 * k:at + 2 * k + 3]
            at += 2 * k + 3
            kept, bad = round(kept), round(bad)
            for key, s in zip(keys, sums):
                if kept:
                    acc = self._window.setdefault(f"{group}/{key}", [0.0, 0])
                    acc[0], acc[1] = acc[0] + s, acc[1] + kept
            if e.steps > kept:
                self._skipped[group] = self._skipped.get(group, 0) + e.steps - kept
            if bad:
                nonfinite += bad
                if first is None or first_bad < first[1]:
                    first = (group, round(first_bad), {key: s / bad for key, s in zip(keys, bad_sums)})
        self._entries.clear()
        self.budget -= nonfinite
        self._bad_total = torch.zeros((), device=self.device)
        self._halted = self._bad_total > self.budget
        return Read(nonfinite, first)

    def window(self) -> dict[str, float]:
        """The means of the window's values (each key over the steps that applied it) and the number of skipped
        steps per group (``GROUP/skipped``, when any); the next window starts empty. Call after :meth:`read`."""
        means = {k: s / n for k, (s, n) in self._window.items()}
        means.update({f"{g}/skipped": float(n) for g, n in self._skipped.items()})
        self._window, self._skipped = {}, {}
        return means
