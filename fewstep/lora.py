"""LoRA students and one frozen base shared by several networks, with peft (DESIGN.md §9, docs/LORA.md).

A recipe's ``lora:`` section (:class:`fewstep.config.LoraConfig`) turns the student into a peft LoRA
adapter on frozen teacher weights. Every network that a method builds as a copy of the student (DMD2's
fake score, MSD's students and fake scores, targets, the evaluation EMA, snapshots) becomes another
adapter on the *same* frozen diffusers model, so memory holds one model plus small adapters, however
many networks a method needs. The networks handed to the method are :class:`LoraBackbone` views: a
:class:`~fewstep.backbones.Backbone` whose ``forward`` activates its own adapter on the shared model for
the duration of the call, so methods are unchanged, and whose parameters, ``state_dict`` and
``deepcopy`` are those of its adapter (plus its own extra scalar embeddings): optimizers, checkpoints,
EMA updates and target networks see adapter weights only, without knowing about LoRA.

Where the student is built from the teacher's weights unchanged (most methods), the frozen base *is*
the teacher's model, and the teacher's own calls run with every adapter disabled. A student whose
diffusers model differs from the teacher's only in its widened input convolution (self-conditioning,
CAF's velocity input) gets its own frozen base, and its input convolution gets an adapter too.

Switching adapters and autograd: a forward pass records the adapter weights it used in the autograd
graph, so switching to another adapter between forward passes of one step leaves each graph correct.
Switching is done without peft's ``set_adapter``, which also toggles ``requires_grad`` (it would hand
gradients to a frozen network, e.g. to the fake score on the generator's turn); ``requires_grad`` stays
the trainer's business. Gradient checkpointing recomputes blocks in backward, after the forward has
switched adapters back: :meth:`SharedBase.checkpoint` makes the recomputation run with the adapter that
was active in the forward pass.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fewstep.backbones import Backbone

if TYPE_CHECKING:
    from fewstep.config import LoraConfig
    from fewstep.types import Nets, RunContext

__all__ = ["DEFAULT_TARGETS", "LORA_WEIGHTS", "SCALARS_FILE", "LoraBackbone", "SharedBase", "adapt_student",
           "adapter_export_problem", "check_adapter_export", "export_lora", "load_lora", "materialize", "place_adapters",
           "require_adapter_export", "save_lora", "share_networks"]

#: diffusers' file name for LoRA weights (``pipe.load_lora_weights(folder)`` looks for it).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: fewstep's extra scalar embeddings (s, w) of a LoRA student: no diffusers LoRA format holds them.
SCALARS_FILE = "fewstep_lora_scalars.safetensors"

# LCM-LoRA's UNet targets (attention, projections, feed-forward, ResNet convolutions, time projections,
# resamplers), as in diffusers' LCM-LoRA distillation script; names peft matches as module-path suffixes.
_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                 "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# Transformer attention (with the joint-attention context projections of SD3 / Flux) and feed-forward layers.
_TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                        "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
#: Default ``lora.target_modules`` by Backbone.kind; other kinds: the UNet list for "unet*", else the transformer list.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"unet2d": _UNET_TARGETS, "unet2d_condition": _UNET_TARGETS,
                                                "dit": _TRANSFORMER_TARGETS}
_INPUT_CONV = {"dit": "pos_embed.proj"}  # the layer add_input_channels widens; UNets: conv_in


def default_targets(backbone: Backbone) -> list[str]:
    """The family's LoRA targets; plus the input convolution when it was widened for extra input channels
    (its new channels start at zero and can only be learnt through an adapter on a frozen base)."""
    kind = backbone.kind
    targets = list(DEFAULT_TARGETS.get(kind, _UNET_TARGETS if kind.startswith("unet") else _TRANSFORMER_TARGETS))
    if backbone.extra_channels:
        targets.append(_INPUT_CONV.get(kind, "conv_in"))
    return targets


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(path, m) for path, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


class SharedBase:
    """One frozen diffusers model hosting one peft LoRA adapter per network.

    ``active`` is the adapter in use (None: all disabled, the teacher's state). :meth:`use` switches it
    for a block of code; nothing else does, so outside every view's forward the model is the plain base.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
        self.model = model
        self.config = config
        self.targets = targets
        self.active: str | None = None
        self.layers: list[tuple[str, nn.Module]] = []
        self._count = 0
        model.requires_grad_(False)

    def new_adapter(self, trainable: bool) -> str:
        """Add an adapter and return its name: diffusers' PeftAdapterMixin.add_adapter where the model has
        it, else peft's inject_adapter_in_model (UNet2DModel), recording the config in ``model.peft_config``
        as diffusers does. Every other parameter's ``requires_grad`` is kept (add_adapter's set_adapter
        would change them)."""
        from peft import LoraConfig, inject_adapter_in_model

        name = f"adapter_{self._count}"
        self._count += 1
        flags = {p: p.requires_grad for p in self.model.parameters()}
        cfg = self.config
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=list(self.targets),
                            init_lora_weights=True if cfg.init == "default" else cfg.init)
        with warnings.catch_warnings():  # peft warns about a second adapter: sharing is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            if hasattr(self.model, "add_adapter"):
                self.model.add_adapter(config, adapter_name=name)
            else:
                inject_adapter_in_model(config, self.model, adapter_name=name)
                if not hasattr(self.model, "peft_config"):
                    self.model.peft_config = {}
                self.model.peft_config[name] = config
        for p in self.model.parameters():
            p.requires_grad_(flags.get(p, trainable))
        self.layers = _tuner_layers(self.model)
        for _, layer in self.layers:
            # peft keeps the active adapter and the off switch in these two attributes (checked with peft
            # 0.21; their public setters also toggle requires_grad, see the module docstring).
            if not (hasattr(layer, "_active_adapter") and hasattr(layer, "_disable_adapters")):
                import peft

                raise RuntimeError(f"peft {peft.__version__}: {type(layer).__name__} has no _active_adapter / "
                                   "_disable_adapters; fewstep's adapter switching needs peft >= 0.10")
        self._set(self.active)
        return name

    def drop_adapter(self, name: str) -> None:
        """Remove an adapter from the model (peft's delete_adapter on every LoRA layer)."""
        for _, layer in self.layers:
            layer.delete_adapter(name)
        self.model.peft_config.pop(name, None)
        self.layers = _tuner_layers(self.model)
        self._set(self.active)

    def _set(self, name: str | None) -> None:
        for _, layer in self.layers:
            if name is not None:
                layer._active_adapter = [name]
            layer._disable_adapters = name is None
        self.active = name

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the body with adapter ``name`` active (None: the bare base), then restore the previous one."""
        previous = self.active
        self._set(name)
        try:
            yield
        finally:
            self._set(previous)

    def checkpoint(self, function: Callable[..., Any], *args: Any) -> Any:
        """diffusers' ``gradient_checkpointing_func``: torch's non-reentrant checkpoint whose recomputation
        in backward runs with the adapter that was active in the forward pass."""
        name = self.active

        def run(*inputs: Any) -> Any:
            with self.use(name):
                return function(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class LoraBackbone(Backbone):
    """A network that is one adapter on a :class:`SharedBase` (see the module docstring).

    Behaves as a :class:`Backbone` (same call, attributes and ``bottleneck``). Its parameters are its
    adapter's LoRA weights (``lora.<module path with - for .>.lora_A/lora_B``) and its own extra scalar
    embeddings; the shared model is reachable as ``.model`` but is not a submodule, so ``.to()``,
    ``state_dict()`` and optimizers never touch it. ``copy.deepcopy`` gives a new adapter on the same
    base with the same weights (how methods build fake scores, targets and EMAs); ``save_pretrained``
    writes a full diffusers model with the adapter merged (:func:`materialize`).
    """

    def __init__(self, base: SharedBase, like: Backbone, *, trainable: bool = True) -> None:
        super().__init__(base.model, like.extra_scalars, num_classes=like.num_classes,
                         extra_channels=like.extra_channels, self_conditioning=like.self_conditioning,
                         image_channels=like.image_channels, scalar_defaults=like.scalar_defaults)
        object.__setattr__(self, "model", self._modules.pop("model"))  # reachable, but not a submodule
        self.base = base
        self.adapter = base.new_adapter(trainable)
        layers: dict[str, nn.Module] = {}
        for path, layer in base.layers:
            own = {key: getattr(layer, key)[self.adapter] for key in (*layer.adapter_layer_names, "lora_dropout")
                   if isinstance(getattr(layer, key, None), nn.ModuleDict) and self.adapter in getattr(layer, key)}
            if own:
                layers[path.replace(".", "-")] = nn.ModuleDict(own)
        self.lora = nn.ModuleDict(layers)
        self.scalar_embeddings.load_state_dict(like.scalar_embeddings.state_dict())
        self.requires_grad_(trainable)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.base.use(self.adapter):
            return super().forward(*args, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing(self.base.checkpoint)

    def __deepcopy__(self, memo: dict[int, Any]) -> LoraBackbone:
        clone = LoraBackbone(self.base, self)
        with torch.no_grad():
            for mine, theirs in zip(clone.parameters(), self.parameters(), strict=True):
                mine.data = theirs.detach().clone()
                mine.requires_grad_(theirs.requires_grad)
        for name, buffer in self._buffers.items():
            if name not in clone._buffers:
                clone.register_buffer(name, None if buffer is None else buffer.clone())
        clone.train(self.training)
        memo[id(self)] = clone
        return clone

    def save_pretrained(self, folder: str | Path) -> None:
        materialize(self).save_pretrained(folder)


def materialize(view: Backbone, adapter: str | None = None) -> Backbone:
    """A full float32 :class:`Backbone` equal to ``view`` with ``adapter`` active: the base weights with
    the adapter merged (W + B A · alpha / r, peft's ``get_delta_weight``; no adapter: the bare base) and
    the view's own scalar embeddings. ``adapter`` defaults to a LoraBackbone's own."""
    if adapter is None and isinstance(view, LoraBackbone):
        adapter = view.adapter
    full = Backbone.from_config_dict(view.config_dict())
    state: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, value in view.model.state_dict().items():
            if ".lora_" not in key:
                state[key.replace(".base_layer.", ".")] = value.detach().float()
        for path, layer in _tuner_layers(view.model) if adapter is not None else ():
            if adapter in layer.lora_A:
                weight = f"{path}.weight"
                state[weight] = state[weight] + layer.get_delta_weight(adapter).float().to(state[weight].device)
        full.model.load_state_dict(state)
        full.scalar_embeddings.load_state_dict(view.scalar_embeddings.state_dict())
    return full.float().to(state[next(iter(state))].device)


class _TeacherBackbone(Backbone):
    """The teacher's Backbone once its model hosts the adapters: a deep copy (e.g. a discriminator built
    from the teacher's encoder) is a plain Backbone of the teacher's weights, without adapters or views."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Backbone:
        clean = materialize(self).to(dtype=self.model.dtype).requires_grad_(False).train(self.training)
        memo[id(self)] = clean
        return clean


# ------------------------------------------------------------------------------------------------
# The trainer's three calls: the student, the other networks, their placement


def _signature(model: nn.Module, skip: str | None = None) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if skip is None or not k.startswith(skip + ".")}


def adapt_student(config: Any, teacher: Any, student: nn.Module) -> nn.Module:
    """The student as a :class:`LoraBackbone` when the recipe has a ``lora`` section, else unchanged.

    The base is the teacher's own model when the student's diffusers weights equal the teacher's; a
    student that differs only in its widened input convolution gets its own frozen base; any other
    student (e.g. MSD's smaller students, which are new networks) is refused."""
    cfg = config.lora
    if cfg is None:
        return student
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("lora: the recipe's lora section needs peft; install it with pip install 'fewstep[lora]'") \
            from None
    if not isinstance(student, Backbone):
        raise ValueError(f"lora: the student is a {type(student).__name__}, not a fewstep Backbone; LoRA adapts "
                         "backbones built from the teacher (remove the lora section for this method)")
    # A native guidance input would be a new layer in the frozen (teacher's) base: a LoRA student keeps w in its own
    # scalar embedding, which the stock export folds at the sampling w (docs/EXPORT.md).
    student.embed_guidance_as_scalar()
    mine, theirs = _signature(student.model), _signature(teacher.net.model)
    if mine.keys() == theirs.keys() and all(v.shape == theirs[k].shape and torch.equal(v, theirs[k].to(v.dtype))
                                            for k, v in mine.items()):
        model = teacher.net.model
        teacher.net.__class__ = _TeacherBackbone  # same object and hooks; only deepcopy changes
    else:
        conv = _INPUT_CONV.get(student.kind, "conv_in")
        mine, theirs = _signature(student.model, conv), _signature(teacher.net.model, conv)
        if not student.extra_channels or mine.keys() != theirs.keys() or not all(
                v.shape == theirs[k].shape and torch.equal(v, theirs[k].to(v.dtype)) for k, v in mine.items()):
            raise ValueError(f"lora: method {config.method.name!r} builds a student that is not a copy of the teacher "
                             "(other layers or weights, e.g. MSD's smaller students); LoRA trains adapters on frozen "
                             "teacher weights: remove the lora section or build the student from the teacher")
        model = student.model.float()
    targets = list(cfg.target_modules) if cfg.target_modules is not None else default_targets(student)
    try:
        return LoraBackbone(SharedBase(model, cfg, targets), student)
    except ValueError as exc:  # peft: no module of the model matches the targets
        raise ValueError(f"lora.target_modules {targets}: {exc}") from None


def share_networks(config: Any, student: nn.Module, extra: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """After ``fewstep_extra_networks`` (before the teacher is cast to the compute dtype): trainable copies
    of the student that ``lora.networks`` does not list become full networks (:func:`materialize`)."""
    cfg = config.lora
    if cfg is None or cfg.networks is None:
        return extra
    views = {name: net for name, net in {"student": student, **extra}.items() if isinstance(net, LoraBackbone)}
    trainable = {name for name, net in views.items() if any(p.requires_grad for p in net.parameters())}
    if "student" not in cfg.networks or (unknown := set(cfg.networks) - trainable):
        unknown = sorted(set(cfg.networks) - trainable) or ["(student missing)"]
        raise ValueError(f"lora.networks: {unknown} are not trainable copies of the student in method "
                         f"{config.method.name!r}; it has {sorted(trainable)} (the list must include 'student')")
    out = dict(extra)
    for name in sorted(trainable - set(cfg.networks)):
        out[name] = materialize(views[name]).requires_grad_(True)
        views[name].base.drop_adapter(views[name].adapter)
    return out


def place_adapters(teacher: Any, networks: list[nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """After the teacher's cast to the compute dtype (which also cast the adapters living in its model):
    adapters back to float32, a base of the student's own in the compute dtype on ``device``."""
    views = [net for net in networks if isinstance(net, LoraBackbone)]
    for model in {id(v.model): v.model for v in views if v.model is not teacher.net.model}.values():
        model.to(device, dtype)
    for view in views:  # after every cast of a base: a later cast would round earlier views' adapters again
        view.float()


# ------------------------------------------------------------------------------------------------
# Export: diffusers' LoRA format


#: The diffusers LoRA loader of each transformer kind's stock pipeline (DiTPipeline and the PixArt pipelines have none).
_TRANSFORMER_LOADERS = {"sd3": "SD3LoraLoaderMixin", "flux": "FluxLoraLoaderMixin", "sana": "SanaLoraLoaderMixin"}


def save_lora(view: LoraBackbone, folder: str | Path) -> Path:
    """Write ``view``'s adapter to ``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA format.

    UNets: through ``StableDiffusionPipeline.save_lora_weights`` (keys ``unet.<module>.lora_A.weight``,
    peft's config as metadata), which ``pipe.load_lora_weights(folder)`` of the teacher's stock pipeline
    reads, also into a fine-tune of the same base. Transformers: through the family's loader
    (SD3LoraLoaderMixin, FluxLoraLoaderMixin, SanaLoraLoaderMixin; keys and metadata under ``transformer.``), which
    the family's ``pipe.load_lora_weights(folder)`` reads; DiT and PixArt have no diffusers loader at all:
    :func:`load_lora` (``load_lora(pipe.transformer, folder)``). Extra scalar
    embeddings (CTM's s, guidance w) have no place in the format: they go to ``fewstep_lora_scalars.safetensors``,
    which :meth:`fewstep.export.FewStepPipeline.load_lora_weights` reads and a stock pipeline ignores.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu()
             for k, v in get_peft_model_state_dict(view.model, adapter_name=view.adapter).items()}
    metadata = view.model.peft_config[view.adapter].to_dict()
    metadata = json.loads(json.dumps(metadata, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    if view.kind.startswith("unet"):
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    else:
        import diffusers.loaders.lora_pipeline as loaders

        # The family's loader writes the keys and the metadata under "transformer." (the metadata's prefix is what
        # load_lora_weights filters on); families without a loader (DiT, PixArt) get the same layout.
        mixin = getattr(loaders, _TRANSFORMER_LOADERS.get(view.kind, "SD3LoraLoaderMixin"))
        mixin.save_lora_weights(folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)
    if view.extra_scalars:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in view.scalar_embeddings.state_dict().items()},
                  str(folder / SCALARS_FILE))
    return folder / LORA_WEIGHTS


def load_lora(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load a LoRA export (``folder/pytorch_lora_weights.safetensors``, :func:`save_lora`) into a diffusers ``model``
    with peft: the adapter's config from the file's metadata, its weights without their ``unet.`` /
    ``transformer.`` prefix. For denoisers that diffusers cannot load a LoRA into (DiT's and PixArt's transformers
    have no ``load_lora_adapter`` and their pipelines no ``load_lora_weights``); returns ``model``."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    path = Path(folder) / LORA_WEIGHTS
    with safe_open(str(path), "pt") as file:
        metadata = (file.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
        state = {key: file.get_tensor(key) for key in file.keys()}
    if metadata is None or not state:
        raise ValueError(f"{path}: no LoRA weights with peft's config in the metadata; write it with fewstep export")
    prefix = next(iter(state)).split(".")[0] + "."
    config = LoraConfig(**{k[len(prefix):]: v for k, v in json.loads(metadata).items() if k.startswith(prefix)})
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    set_peft_model_state_dict(model, {k[len(prefix):]: v for k, v in state.items()}, adapter_name=adapter_name)
    return model


def adapter_export_problem(stock: Any, reason: str) -> str | None:
    """Why ``lora.export: adapter`` cannot stand for this student, or None when it can.

    The LoRA file alone is the student only when the teacher's stock pipeline, with the adapter loaded and the stock
    scheduler of the export, runs the student's sampler: ``stock`` (a :class:`fewstep.export.StockExport`, or None
    with ``reason``, from :func:`fewstep.export.plan_stock_export`) must exist and fold no scalar inputs into the
    denoiser (the fused export folds a constant ``w`` into its time biases; the LoRA format has no place for it)."""
    if stock is None:
        return f"its sampler needs fewstep's FewStepPipeline: {reason}"
    if stock.scalars:
        return (f"its stock export folds the constant scalar inputs {dict(stock.scalars)} into the denoiser's time "
                "biases, which diffusers' LoRA format cannot carry")
    return None


def require_adapter_export(method: str, stock: Any, reason: str) -> None:
    """Raise a ValueError saying what to set instead where :func:`adapter_export_problem` finds one."""
    problem = adapter_export_problem(stock, reason)
    if problem is not None:
        raise ValueError(f"lora.export: adapter writes only {LORA_WEIGHTS}, for the teacher's own stock pipeline's "
                         f"load_lora_weights, but method {method!r}'s student is not the teacher plus that adapter: "
                         f"{problem}. Set lora.export: both (a full export with the adapter fused, plus the LoRA "
                         "file, which its pipeline loads on the base's denoiser; docs/LORA.md)")


def check_adapter_export(hook: Any, ctx: RunContext, nets: Nets) -> None:
    """At setup, before training: :func:`require_adapter_export` for a run with ``lora.export: adapter`` and
    ``export.enabled``, so that a student the LoRA file alone cannot stand for is refused before any work."""
    lora, export = getattr(ctx.config, "lora", None), getattr(ctx.config, "export", None)
    if lora is None or lora.export != "adapter" or export is None or not export.enabled:
        return
    from fewstep.export import plan_stock_export

    names = sorted({n for found in hook.fewstep_sampling_networks(ctx=ctx) for n in (found or [])})
    plan = plan_stock_export(hook, ctx, nets, names)
    stock, reason = (None, plan) if isinstance(plan, str) else (plan, "")
    require_adapter_export(ctx.method.name, stock, reason)


def export_lora(ctx: RunContext, nets: Nets, out_dir: Path) -> Path:
    """The sampling network's adapter (the EMA's when the run keeps one) into ``out_dir`` (:func:`save_lora`)."""
    from fewstep.export import EXPORT_META
    from fewstep.nn import unwrap
    from fewstep.sampling import sampling_net

    net = unwrap(sampling_net(nets))
    if not isinstance(net, LoraBackbone):
        raise ValueError(f"lora export: the sampling network is a {type(net).__name__}, not a LoRA adapter")
    if ctx.is_main:
        save_lora(net, out_dir)
        card, meta = Path(out_dir) / "README.md", Path(out_dir) / EXPORT_META
        if card.is_file() and meta.is_file():  # the model card of a full export: say what the extra file is
            custom = json.loads(meta.read_text())["pipeline"] == "FewStepPipeline"
            component = net.family.denoiser_component
            # diffusers loads a LoRA through the pipeline only for UNet2DConditionModel and SD3/Flux/Sana
            # transformers; UNet2DModel (DDPM / consistency pipelines), DiT and PixArt: peft, via load_lora
            loader = ("pipe.load_lora_weights(\"<this folder>\")"
                      if custom or net.kind == "unet2d_condition" or net.kind in _TRANSFORMER_LOADERS else
                      f"fewstep.lora.load_lora(pipe.{component}, \"<this folder>\")")
            where = (f"in this folder's FewStepPipeline built on the teacher's {type(net.model).__name__} (or a "
                     f"fine-tune's), `FewStepPipeline.from_pretrained(\"<this folder>\", {component}=<it>)`"
                     if custom else "in the teacher's pipeline (or a fine-tune of it), with this folder's scheduler")
            card.write_text(card.read_text().rstrip() + f"\n\n## LoRA\n\nThe weights above have the adapter fused in. "
                            f"`{LORA_WEIGHTS}` is the adapter alone (rank {net.base.config.rank}, diffusers' LoRA "
                            f"format): {where}, `{loader}`.\n")
    return Path(out_dir)
