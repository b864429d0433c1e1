"""What the accelerate launcher asks for, against the recipe, and how a run's networks are distributed
(docs/DISTRIBUTED.md).

``accelerate launch`` passes its config file to the processes as environment variables
(``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_DEEPSPEED_CONFIG_FILE``...). The recipe's ``train.mixed_precision`` decides the compute dtype
(it is part of what a resumed run must replay); a launcher that asks for a different reduced precision is
refused, never silently overridden. A launcher "no" cannot be told apart from a launch without any config
(accelerate writes "no" by default), so it defers to the recipe.

:func:`sharding_plan` decides, from a method's networks and optimizer groups and the engine accelerate runs
(:func:`accelerator_engine`), which networks accelerate prepares (and shards under FSDP2 / ZeRO-3), which stay
replicated, how EMA and target networks follow a sharded network, and how checkpoints and the export read
them. The plan is pure Python (no accelerate, no torch.distributed), so every method x engine is tested on a CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LaunchConflict(ValueError):
    """The accelerate launcher's settings contradict the recipe."""


def launcher_precisions(env: Mapping[str, str]) -> dict[str, str]:
    """Reduced precisions the launch asks for, by where they come from: {"accelerate config": "bf16",
    "DeepSpeed config <file>": "fp16"}; absent entries ask for nothing."""
    found: dict[str, str] = {}
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("", "no"):
        found["the accelerate config (ACCELERATE_MIXED_PRECISION)"] = mp
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and ds_file and Path(ds_file).is_file():
        ds = json.loads(Path(ds_file).read_text())
        for key in ("bf16", "fp16"):
            if ds.get(key, {}).get("enabled") is True:  # "auto" follows accelerate's choice, hence the recipe
                found[f"the DeepSpeed config {ds_file} ({key}.enabled)"] = key
    return found


def check_mixed_precision(recipe: str, env: Mapping[str, str] | None = None) -> None:
    """Refuse a launch whose accelerate or DeepSpeed config asks for another reduced precision than the recipe's
    ``train.mixed_precision`` ("no", "bf16" or "fp16")."""
    env = os.environ if env is None else env
    for source, value in launcher_precisions(env).items():
        if value != recipe:
            raise LaunchConflict(
                f"train.mixed_precision is {recipe!r} in the recipe but {source} asks for {value!r}; fewstep never "
                f"overrides one with the other. Fix: set train.mixed_precision: {value} in the recipe (--set "
                f"train.mixed_precision={value}), or launch with --mixed_precision {recipe} / change the config file")


#: Engines by what they keep whole between steps: "ddp" (also one process), DeepSpeed "zero0".."zero3",
#: "fsdp1" and "fsdp2". FSDP2 and ZeRO-3 shard the parameters themselves.
ENGINES = ("ddp", "zero0", "zero1", "zero2", "zero3", "fsdp1", "fsdp2")
SHARDED = ("fsdp2", "zero3")


def accelerator_engine(accelerator: object) -> str:
    """The engine an accelerate ``Accelerator`` (or its state) runs: its distributed type, FSDP version and
    DeepSpeed ZeRO stage, as one of :data:`ENGINES`. Duck-typed (``distributed_type``, ``state.fsdp_plugin``,
    ``state.deepspeed_plugin``), so the plan is testable without a launcher."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    state = getattr(accelerator, "state", accelerator)
    if kind == "FSDP":
        return f"fsdp{int(getattr(state.fsdp_plugin, 'fsdp_version', 1) or 1)}"
    if kind == "DEEPSPEED":
        stage = getattr(state.deepspeed_plugin, "zero_stage", None)
        return f"zero{int(stage) if stage is not None else 2}"  # accelerate's DeepSpeedPlugin default: ZeRO-2
    return "ddp"


@dataclass(frozen=True)
class ShardingPlan:
    """How one run's networks are distributed (docs/DISTRIBUTED.md, "Which networks are sharded").

    placement: network -> "sharded" (parameters split across processes between steps) or "replicated" (a whole
    copy on every process); the teacher is always listed. prepared: the trainable networks, in the order they are
    given to accelerate. followers: frozen network -> the trainable network whose architecture it has (an EMA, a
    target, a snapshot); under FSDP2 a follower takes its leader's placement, so ``fewstep.nn.ema_update`` between
    them is a local, communication-free update of each process's shard. gather_followers: ZeRO-3 only: the
    followers stay whole and are updated from parameters gathered for the update (DeepSpeed's partitions are
    flat buffers that no frozen copy shares); the trainer gathers the stepped group's parameters for the EMA/target
    hooks. Whatever the plan, checkpoints hold whole networks (fewstep.builtin.checkpoint).
    """

    engine: str
    placement: dict[str, str]
    prepared: tuple[str, ...]
    followers: dict[str, str] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """Whether any network's parameters are split across processes."""
        return "sharded" in self.placement.values()

    @property
    def gather_followers(self) -> bool:
        """ZeRO-3: the followers stay whole and read their leader's parameters gathered."""
        return self.engine == "zero3"

    def describe(self) -> str:
        """One line per network: placement, and for a follower what it follows."""
        rows = []
        for name, where in self.placement.items():
            role = ("trainable" if name in self.prepared else
                    f"follows {self.followers[name]}" if name in self.followers else "frozen")
            rows.append(f"{name}: {where} ({role})")
        return f"{self.engine}: " + "; ".join(rows)


def sharding_plan(engine: str, groups: Mapping[str, Sequence[str]], networks: Mapping[str, Hashable], *,
                  lora: bool = False, jvp: str | None = None, accumulation: int = 1,
                  nonfinite_skip: bool = False) -> ShardingPlan:
    """The plan for a run, or a :class:`LaunchConflict` naming what cannot work and the fix.

    engine: one of :data:`ENGINES`. groups: optimizer group -> the networks it trains. networks: every network
    except the teacher (the student and the method's extra networks) -> an architecture fingerprint (equal
    fingerprints: same parameter names and shapes). lora: the student is a LoRA adapter (docs/LORA.md). jvp:
    the method's resolved JVP mode through the student ("exact", "finite_difference"), None without one.
    accumulation, nonfinite_skip: ``train.accumulation`` and ``train.nonfinite == "skip"`` (DeepSpeed steps inside
    ``Accelerator.backward``, so neither can work there).

    Decisions (docs/DISTRIBUTED.md): the teacher is frozen and replicated under every engine (in the compute
    dtype it is 2 bytes per parameter, against 16 for a trained fp32 network with Adam; sharding it would add an
    all-gather to every teacher call). Trainable networks are prepared by accelerate: replicated under DDP and
    ZeRO-0/1/2, sharded under FSDP2 and ZeRO-3. A frozen network with a trainable network's architecture (EMA,
    target, snapshot) follows it: sharded the same way under FSDP2 (updated shard by shard, no communication;
    each process holds 1/N of it), whole under ZeRO-3 (updated from gathered parameters). Other frozen networks
    stay replicated.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
    trainable = tuple(dict.fromkeys(n for mods in groups.values() for n in mods))
    if missing := [n for n in trainable if n not in networks]:
        raise ValueError(f"optimizer groups name networks that do not exist: {missing}; networks: {sorted(networks)}")
    if engine == "fsdp1":
        raise LaunchConflict(
            "FSDP version 1 wraps each network in a FullyShardedDataParallel module with flattened parameters, which "
            "fewstep's EMA/target updates and per-network checkpoints cannot address; FSDP2 shards the same "
            "parameters in place and is supported. Fix: set fsdp_version: 2 in the accelerate config (accelerate "
            "launch --fsdp_version 2)")
    if engine.startswith("zero"):
        _check_deepspeed(engine, groups, trainable, accumulation, nonfinite_skip)
    if engine in SHARDED and lora:
        raise LaunchConflict(
            f"{_NAMES[engine]} with a LoRA student: the adapters sit inside the frozen base model that the teacher "
            "and every other adapter share (docs/LORA.md), so sharding one network would shard the teacher's model "
            "under the others, and the adapters themselves are a few percent of the weights. Fix: launch LoRA runs "
            "with DDP (accelerate launch --multi_gpu) or DeepSpeed ZeRO-2")
    if engine == "fsdp2" and jvp == "exact":
        raise LaunchConflict(
            "FSDP2 and method.jvp: exact: forward-mode AD (torch.func.jvp) through a sharded student is not "
            "verified in fewstep (it ran on a 2-layer network over gloo, not through a diffusers backbone under "
            "FSDP2's all-gather hooks). Fix: set method.jvp: finite_difference (plain forward passes, which FSDP2 "
            "shards as usual), or launch with DDP")
    arch = {networks[n] for n in trainable}
    leaders = {networks[n]: n for n in reversed(trainable)}  # the first trainable network of an architecture
    followers = {n: leaders[fp] for n, fp in networks.items() if n not in trainable and fp in arch}
    sharded_engine = engine in SHARDED
    placement = {"teacher": "replicated"}
    for name in networks:
        shard = sharded_engine and (name in trainable or (engine == "fsdp2" and name in followers))
        placement[name] = "sharded" if shard else "replicated"
    return ShardingPlan(engine, placement, trainable, followers)


_NAMES = {"fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}


def _check_deepspeed(engine: str, groups: Mapping[str, Sequence[str]], trainable: tuple[str, ...],
                     accumulation: int, nonfinite_skip: bool) -> None:
    """accelerate drives one DeepSpeed engine per Accelerator: one model with one optimizer, stepped inside
    ``Accelerator.backward``. Methods with several trainable networks or several optimizer groups need one
    engine each, which accelerate's multi-plugin API (documented as experimental) does not give one training loop.
    Stepping inside backward also means every micro-batch would step (fewstep accumulates without accelerate's
    ``accumulate`` context) and a non-finite step cannot be skipped after the fact."""
    name = engine.replace("zero", "DeepSpeed ZeRO-")
    if len(trainable) > 1 or len(groups) > 1:
        raise LaunchConflict(
            f"{name} with {len(groups)} optimizer group(s) over "
            f"{len(trainable)} trainable network(s) ({', '.join(trainable)}): accelerate runs one DeepSpeed engine "
            "per Accelerator (one model, one optimizer), so only methods that train one network in one group can use "
            "it. Fix: launch with FSDP2 (accelerate launch --use_fsdp --fsdp_version 2), which shards every trainable "
            "network, or with DDP")
    if accumulation != 1:
        raise LaunchConflict(
            f"{name} with train.accumulation={accumulation}: DeepSpeed steps the optimizer inside every backward "
            "pass that fewstep makes, so micro-batches would each take a step. Fix: set train.accumulation: 1 (raise "
            "the number of processes or lower train.batch_size instead), or launch with FSDP2 or DDP")
    if nonfinite_skip:
        raise LaunchConflict(
            f"{name} with train.nonfinite: skip: DeepSpeed has already applied the step when fewstep sees the "
            "non-finite loss or gradient norm, so it cannot be skipped. Fix: set train.nonfinite: stop, or launch "
            "with FSDP2 or DDP")


def deepspeed_settings(ds: Mapping[str, Any], micro_batch: int, max_grad_norm: float | None) -> dict[str, Any]:
    """What fewstep fills into a DeepSpeed config before ``prepare`` (DeepSpeed reads them at start-up), as
    {key: value} with nested keys dotted; a value the config fixes to something else is a conflict.

    train_micro_batch_size_per_gpu: the per-process batch (fewstep has no DataLoader for accelerate to infer it
    from). gradient_clipping: the recipe's ``optimizer.max_grad_norm``, 0 (off) without one; accelerate would fill
    an "auto" clipping with 1.0, clipping every run at norm 1. zero_optimization.stage3_gather_16bit_weights_on_
    model_save: on under ZeRO-3, where checkpoints and the export need whole weights gathered (whatever the config
    says: it changes nothing else)."""
    updates: dict[str, Any] = {}
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        updates["train_micro_batch_size_per_gpu"] = micro_batch
    want = float(max_grad_norm or 0.0)
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":
        updates["gradient_clipping"] = want
    elif float(clip) != want:
        raise LaunchConflict(
            f"optimizer.max_grad_norm is {max_grad_norm} in the recipe but the DeepSpeed config clips gradients at "
            f"{clip} (gradient_clipping); fewstep never overrides one with the other. Fix: set gradient_clipping: "
            f"auto (or {want:g}) in the DeepSpeed config, or optimizer.max_grad_norm: {clip} in the recipe")
    if ds.get("zero_optimization", {}).get("stage") == 3:
        # accelerate writes false here unless zero3_save_16bit_model is set; it only decides whether saving gathers
        updates["zero_optimization.stage3_gather_16bit_weights_on_model_save"] = True
    return updates


def check_features(gradient_checkpointing: bool, compile: bool, env: Mapping[str, str] | None = None) -> None:
    """Refuse an accelerate config that turns on what the recipe also controls: FSDP activation checkpointing
    next to ``train.gradient_checkpointing`` (the blocks would be checkpointed twice), or a dynamo backend next
    to ``train.compile`` (the backbones would be compiled twice). Either one alone is used as asked."""
    env = os.environ if env is None else env
    if gradient_checkpointing and env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in ("true", "1"):
        raise LaunchConflict(
            "train.gradient_checkpointing is on in the recipe and fsdp_activation_checkpointing in the accelerate "
            "config (FSDP_ACTIVATION_CHECKPOINTING): blocks would be checkpointed twice. Fix: turn one of them off "
            "(--set train.gradient_checkpointing=false, or fsdp_activation_checkpointing: false)")
    if compile and env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() not in ("", "no"):
        raise LaunchConflict(
            f"train.compile is on in the recipe and the accelerate config asks for dynamo backend "
            f"{env['ACCELERATE_DYNAMO_BACKEND']!r} (ACCELERATE_DYNAMO_BACKEND): the backbones would be compiled "
            "twice. Fix: --set train.compile=false, or launch with --dynamo_backend no")


def fingerprint(module: object) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A network's architecture for :func:`sharding_plan`: its parameters' names and shapes."""
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())  # type: ignore[attr-defined]


def meta_skeleton(module: Any) -> Any:
    """A deep copy of ``module`` whose parameters are on the meta device (no memory) and whose buffers are real,
    taken before FSDP2 shards ``module`` in place; :func:`materialize` fills it with gathered weights for export
    and sampling after training."""
    import copy

    import torch

    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def materialize(skeleton: Any, state: Mapping[str, Any], device: Any) -> Any:
    """``skeleton`` (from :func:`meta_skeleton`) with the full ``state`` dict's tensors as its weights, on ``device``."""
    skeleton.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    return skeleton
