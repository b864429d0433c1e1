"""Jacobian-vector products through diffusers backbones, for continuous-time methods (sCM, flow maps).

``jvp(fn, primals, tangents)`` returns ``(fn(*primals), d/dh fn(*(primals + h·tangents)) at h = 0)``
in one of two modes:

- ``"exact"``: forward-mode automatic differentiation, ``torch.func.jvp`` (one pass that carries the
  tangent alongside the primal; no activations are stored). Out of the box it fails on every
  diffusers backbone (NOTES.md, "Forward-mode JVP"): the fused scaled-dot-product attention kernels
  have no forward-AD rule, and UNet2DModel's GroupNorm then meets a non-contiguous input it cannot
  view. :func:`forward_ad_ready` fixes both for the duration of the call: attention runs under
  ``sdpa_kernel(SDPBackend.MATH)`` (plain matmuls and softmax, which have forward-AD rules) and a
  global forward pre-hook, removed afterwards, makes every GroupNorm input contiguous.
- ``"finite_difference"``: the documented fallback (sCM spec §6.3 names a finite-difference JVP in
  fp64 as an alternative), a central difference

      (fn(p + h·v) − fn(p − h·v)) / (2h),   h = step / rms(v)   (a float ``step``),

  so the perturbation of the inputs has root-mean-square ``step`` whatever the tangent's scale; or,
  for a batched fn whose samples are independent, per-sample steps h = ``step`` (B,) along each
  sample's tangent (see :func:`window_steps`). Its error is O(h²) truncation plus rounding of order
  ulp(fn)/h, so the two perturbed evaluations run on inputs promoted to ``dtype`` (float64 by
  default): a network called through :func:`module_in_dtype` then also computes in float64
  ("float64 where possible": diffusers computes its sinusoidal timestep features in float32
  whatever the input, so the time direction keeps float32 rounding there). It costs three
  evaluations and works through any code, also code with no forward-AD rule.

Teachers trained on discrete timesteps (DDPM) are only fitted at integer timesteps. Between them
their output oscillates (period about 6 timesteps on the digits teacher: the 1 rad/timestep
sinusoid of the timestep features), so the exact ∂/∂t is dominated by that oscillation: on the
digits teacher the exact time derivative of its flow velocity was 0.6-9x (relative error) off a
±48-timestep average, a ±2 window 0.4-6x, a ±12 window 0.1-1.2x, and sCM / flow-map students trained
with exact tangents produced noise. :func:`window_steps` gives per-sample finite-difference steps
that move the teacher's timestep input by ±window, which differentiates the teacher's smooth
interpolation instead.

Multi-process training: differentiate the *unwrapped* module (``fewstep.nn.unwrap``), never a
DistributedDataParallel wrapper, and call :func:`jvp` under ``torch.no_grad()`` when the tangent is a
stop-gradient quantity: the wrapper's forward talks to its gradient reducer (and may broadcast
buffers), which a forward-mode pass must not do. ``tests/test_scm.py`` checks that ranks stay equal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fewstep.method_configs import TangentOptions  # import-light

__all__ = ["JVPMode", "TangentOptions", "forward_ad_ready", "jvp", "module_in_dtype", "normalize_tangent", "resolve_mode",
           "window_steps"]

JVPMode = Literal["exact", "finite_difference"]
MODES = ("exact", "finite_difference")


def _contiguous_group_norm_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: GroupNorm's forward-AD rule views its input, which must then be contiguous."""
    if isinstance(module, nn.GroupNorm) and args and isinstance(args[0], Tensor):
        return (args[0].contiguous(), *args[1:])
    return None


@contextlib.contextmanager
def forward_ad_ready() -> Iterator[None]:
    """Make diffusers backbones forward-AD-able for the body (see the module docstring).

    Installs a global module forward pre-hook (it fires for every module called in the body, so
    networks hidden inside closures are covered) and selects the math attention kernel; both are
    undone on exit, also on error.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    handle = nn.modules.module.register_module_forward_pre_hook(_contiguous_group_norm_input)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        handle.remove()


def module_in_dtype(module: nn.Module, dtype: torch.dtype = torch.float64) -> Callable[..., Any]:
    """A callable that runs ``module`` with copies of its parameters and buffers cast to ``dtype``.

    The module itself is not touched (``torch.func.functional_call``), so this is safe on a network
    that is being trained, wrapped or shared. For the finite-difference mode of :func:`jvp`; the
    copies are made once, when this is called, so call it again after the weights change.
    """
    state = {name: t.detach().to(dtype) if t.is_floating_point() else t
             for name, t in [*module.named_parameters(), *module.named_buffers()]}

    def call(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(module, state, args, kwargs)

    return call


def _rms(tensors: Sequence[Tensor]) -> Tensor:
    total = sum(t.double().square().sum() for t in tensors)
    count = sum(t.numel() for t in tensors)
    return torch.sqrt(total / max(count, 1))


def jvp(
    fn: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    *,
    mode: JVPMode = "exact",
    step: float | Tensor = 1e-3,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), J_fn(primals) · tangents)``.

    fn: a function of the primals returning one tensor (e.g. a denoiser of (x (B, C, H, W), t (B,)));
        tensors it closes over (network weights, conditioning) are constants.
    primals, tangents: floating tensors, pairwise of the same shape.
    mode: "exact" (forward-mode AD) or "finite_difference" (central difference, see the module
        docstring). step: a float is the root-mean-square size of the input perturbation of the finite
        difference (1e-3 balances truncation and the float32 rounding left in diffusers' timestep
        features); a (B,) tensor gives per-sample steps along the tangent, every primal and the output
        being batched along their first dimension. dtype: the precision of the two perturbed
        evaluations of the finite difference.

    The tangent is returned in the dtype of ``fn``'s output. For a stop-gradient tangent call this
    under ``torch.no_grad()``.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if mode not in MODES:
        raise ValueError(f"jvp: unknown mode {mode!r}; choose one of {MODES}")
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents; give one tangent per primal")
    for i, (p, v) in enumerate(zip(primals, tangents)):
        if not (p.is_floating_point() and v.is_floating_point()) or p.shape != v.shape:
            raise ValueError(f"jvp: primal {i} {tuple(p.shape)} {p.dtype} and its tangent {tuple(v.shape)} {v.dtype} "
                             "must be floating tensors of the same shape")
    if mode == "exact":
        tangents = tuple(v.to(p.dtype) for p, v in zip(primals, tangents))
        with forward_ad_ready():
            return torch.func.jvp(fn, primals, tangents)
    out = fn(*primals)
    if isinstance(step, Tensor):
        h = step.to(out.device, dtype)

        def scaled(v: Tensor) -> Tensor:
            return h.reshape(-1, *([1] * (v.ndim - 1))) * v.to(dtype)

        hi = fn(*(p.to(dtype) + scaled(v) for p, v in zip(primals, tangents)))
        lo = fn(*(p.to(dtype) - scaled(v) for p, v in zip(primals, tangents)))
        two_h = 2 * h.reshape(-1, *([1] * (out.ndim - 1)))
        return out, ((hi.to(dtype) - lo.to(dtype)) / two_h).to(out.dtype)
    scale = _rms(tangents)
    if float(scale) == 0.0:  # host sync, once per call; a zero tangent has a zero derivative
        return out, torch.zeros_like(out)
    h = step / scale.item()
    hi = fn(*(p.to(dtype) + h * v.to(dtype) for p, v in zip(primals, tangents)))
    lo = fn(*(p.to(dtype) - h * v.to(dtype) for p, v in zip(primals, tangents)))
    return out, ((hi.to(dtype) - lo.to(dtype)) / (2 * h)).to(out.dtype)


def window_steps(time_map: Callable[[Tensor], Tensor], t: Tensor, window: float, rate: Tensor | float = 1.0,
                 bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Per-sample finite-difference steps h (B,) that move ``time_map(t)`` by ±``window``.

    t: (B,) the time the JVP differentiates along; rate: dt/dh, how fast a step h along the tangent
    moves t (the time component of the tangent). time_map: t -> the network's timestep input (for
    example ``process.model_time`` of t's level), differentiated exactly (a cheap scalar map). Each
    step is capped so that t ± h·rate stays within half the distance to ``bounds``.
    """
    t = t.detach()
    rate = torch.as_tensor(rate, dtype=t.dtype, device=t.device).abs().expand_as(t)
    _, speed = torch.func.jvp(time_map, (t,), (torch.ones_like(t),))
    h = window / (speed.abs() * rate).clamp_min(torch.finfo(t.dtype).tiny)
    room = 0.5 * torch.minimum(t - bounds[0], bounds[1] - t) / rate.clamp_min(torch.finfo(t.dtype).tiny)
    return torch.minimum(h, room)


# ---------------------------------------------------------------------------------------------
# Options and helpers shared by the continuous-time methods (sCM, flow maps)


def resolve_mode(requested: str, process) -> JVPMode:
    """``jvp: auto`` is finite_difference for DDPM (VP) teachers and exact otherwise (see TangentOptions)."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "finite_difference" if process.kind == "vp" else "exact"


def normalize_tangent(g: Tensor, kind: str, c: float) -> Tensor:
    """g/(||g||₂ + c) with the norm over each whole sample, or g clamped to [-1, 1] (sCM Alg. 1 step 6, AYF
    §9.2), or g itself. g: (B, ...)."""
    if kind == "normalize":
        return g / (g.flatten(1).norm(dim=1) + c).reshape(-1, *([1] * (g.ndim - 1)))
    if kind == "clip":
        return g.clamp(-1.0, 1.0)
    return g
