"""``train.compile: true``: every backbone's diffusers model under ``torch.compile``, with an eager fallback.

The diffusers model inside each :class:`fewstep.backbones.Backbone` (teacher, student, extra networks) is
compiled in place (``nn.Module.compile``), so parameter names, state dicts, checkpoints and exports are
unchanged; fewstep's own wrapper (conditioning, packing, scalar embeddings) stays eager. Compilation happens
at a model's first call. Where it fails (an operator dynamo cannot trace, a forward-mode JVP through the
compiled graph, a missing C++ compiler for inductor on CPU) the model prints one message naming it and runs
eagerly from then on; the failed call is re-run eagerly, so the step's result is the eager result.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn


def compile_backbones(networks: dict[str, nn.Module], *, backend: str | Any = "inductor",
                      announce: bool = True) -> list[str]:
    """Compile the diffusers model of every Backbone among ``networks`` ({label: module}, a module may be
    listed under several labels: compiled once). Returns the labels compiled."""
    from fewstep.backbones import Backbone
    from fewstep.nn import unwrap

    done: set[int] = set()
    labels = []
    for label, module in networks.items():
        for sub in unwrap(module).modules():
            if isinstance(sub, Backbone) and id(sub.model) not in done:
                done.add(id(sub.model))
                guard_compiled(sub.model, f"{label} ({type(sub.model).__name__})", backend, announce)
                labels.append(label)
    return labels


def guard_compiled(model: nn.Module, name: str, backend: str | Any, announce: bool) -> None:
    """``model.compile(backend=...)``, with its compiled call wrapped so that a compile failure falls back to eager.

    Relies on ``nn.Module._compiled_call_impl`` (what ``Module.compile`` sets and ``Module.__call__`` uses,
    torch >= 2.2)."""
    model.compile(backend=backend)
    compiled = model._compiled_call_impl

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the eager re-run below reports real errors
            model._compiled_call_impl = None  # Module.__call__ goes back to the eager implementation
            if announce:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"fewstep: train.compile: torch.compile failed on {name} ({type(exc).__name__}: {first[:200]}); "
                      "it runs eagerly from now on", file=sys.stderr, flush=True)
            return model._call_impl(*args, **kwargs)

    model._compiled_call_impl = call
