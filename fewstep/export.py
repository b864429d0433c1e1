"""The diffusers export of a trained student and the pipeline that samples from it (DESIGN.md §7).

An export folder, written at the end of training and by ``fewstep export RUN OUT``::

    model_index.json       the pipeline class and components: DiffusionPipeline.from_pretrained(OUT) loads it
    pipeline_fewstep.py    two lines re-exporting FewStepPipeline (diffusers finds a pipeline class named
                           in model_index.json in a file of the folder); absent for stock pipelines
    unet/ | transformer/   the student (its EMA when the run keeps one): diffusers weights and config, plus
                           fewstep's metadata and extra scalar embeddings (Backbone.save_pretrained)
    scheduler/             the teacher's noise process as a diffusers scheduler config, or the stock
                           few-step scheduler (e.g. CMStochasticIterativeScheduler)
    vae/, text_encoder/, tokenizer/   copied from the teacher folder, where the teacher has them
    fewstep_extra/<name>/  other networks the method's sampler needs (hook fewstep_sampling_networks)
    fewstep_export.json    method, plugin, the resolved recipe, default steps, the noise process, metrics
    README.md              the model card

:class:`FewStepPipeline` samples with the method plugin's own ``fewstep_sample`` (so an export draws
exactly the images fewstep's sampler draws); it needs fewstep and the method's plugin installed.
Where a stock diffusers pipeline reproduces the sampler exactly, the method writes that pipeline
instead (``write_export(..., pipeline="ConsistencyModelPipeline", scheduler=...)``); fewstep still
reads such a folder with :func:`load_export`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor, nn

from fewstep.types import Cond, Nets, RunContext

__all__ = ["EXPORT_META", "FewStepPipeline", "LoadedExport", "export_run", "load_export", "run_metrics", "write_export"]

EXPORT_META = "fewstep_export.json"
PIPELINE_FILE = "pipeline_fewstep"
EXTRA_DIR = "fewstep_extra"
_FORMAT = 1
_SHIM = '''"""Makes `diffusers.DiffusionPipeline.from_pretrained(<this folder>)` find fewstep's pipeline.

Needs `pip install fewstep` and the plugin of the method that made this export."""
from fewstep.export import FewStepPipeline  # noqa: F401
'''


def _component(net: nn.Module) -> str:
    return "transformer" if getattr(net, "kind", "") == "dit" else "unet"


def write_export(ctx: RunContext, nets: Nets, out_dir: Path, *, student: nn.Module,
                 extra: dict[str, nn.Module] | None = None, pipeline: str | None = None,
                 scheduler: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> Path:
    """Write the export folder (layout in the module docstring) and return it.

    student: the sampling network (a Backbone). extra: further sampling networks by name.
    pipeline: a stock diffusers pipeline class name, or None for :class:`FewStepPipeline`.
    scheduler: the scheduler config to write (default: the teacher process's). metrics: for the card.
    """
    import diffusers

    from fewstep.nn import unwrap

    teacher = nets.teacher
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    student = unwrap(student)
    name = _component(student)
    student.save_pretrained(out_dir / name)
    process_config = teacher.process.scheduler_config()
    scheduler = scheduler or process_config
    (out_dir / "scheduler").mkdir()
    sched_file = {**scheduler, "_diffusers_version": diffusers.__version__}
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_file, indent=2) + "\n")
    index: dict[str, Any] = {
        "_class_name": pipeline or [PIPELINE_FILE, "FewStepPipeline"],
        "_diffusers_version": diffusers.__version__,
        name: ["diffusers", type(student.model).__name__],
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    for component, library in (("vae", "diffusers"), ("text_encoder", "transformers"), ("tokenizer", "transformers")):
        module = getattr(teacher, component)
        if module is None:
            continue
        source = teacher.source / component
        if source.is_dir():  # the teacher's own files, bit for bit (not its compute-dtype copy)
            shutil.copytree(source, out_dir / component)
        else:
            module.save_pretrained(out_dir / component)
        index[component] = [library, type(module).__name__]
    if pipeline is None:
        (out_dir / f"{PIPELINE_FILE}.py").write_text(_SHIM)
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for extra_name, module in (extra or {}).items():
        unwrap(module).save_pretrained(out_dir / EXTRA_DIR / extra_name)
    cfg = ctx.config
    meta = {
        "format": _FORMAT,
        "method": cfg.method.name,
        "component": name,
        "pipeline": pipeline or "FewStepPipeline",
        "steps": cfg.export.steps,
        "sampling_networks": sorted(extra or {}),
        "process": process_config,
        "teacher": str(teacher.source),
        "config": cfg.dump(),
        "metrics": metrics or {},
    }
    (out_dir / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(meta, teacher))
    return out_dir


def model_card(meta: dict[str, Any], teacher: Any) -> str:
    """A short Markdown model card: what the student is, how to sample it, what it scored."""
    import yaml

    method, steps = meta["method"], meta["steps"]
    if teacher.conditioning == "class":
        call = f"pipe(num_inference_steps={steps}, class_labels=[0, 1, 2, 3])"
    elif teacher.conditioning == "text":
        call = f'pipe(num_inference_steps={steps}, prompt=["a photo of a cat"])'
    else:
        call = f"pipe(num_inference_steps={steps}, batch_size=4)"
    lines = [
        f"# fewstep student: {method}",
        "",
        f"A {steps}-step generator distilled by fewstep with the `{method}` method from the teacher "
        f"`{meta['teacher']}`.",
        "",
        f"- pipeline: `{meta['pipeline']}`; backbone: `{meta['component']}`",
        f"- teacher process: {teacher.process.describe()}",
        f"- conditioning: {teacher.conditioning}",
        "",
        "## Sampling",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        "pipe = DiffusionPipeline.from_pretrained(\"<this folder>\")",
        f"images = {call}.images",
        "```",
        "",
    ]
    if meta["pipeline"] == "FewStepPipeline":
        lines += ["`FewStepPipeline` runs fewstep's own sampler of the method: it needs `pip install fewstep` "
                  "(and the method's plugin, when it is not built in).", ""]
    evaluation = meta["metrics"]
    rows = {k: v for k, v in evaluation.items() if isinstance(v, dict)}
    if rows:
        lines += [f"## Metrics (n = {evaluation.get('num')}, against {evaluation.get('reference')})", "",
                  "| row | FID | precision | recall | samples/s |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['fid']:.2f} | {v['precision']:.3f} | {v['recall']:.3f} | {v['samples_per_s']} |"
                  for k, v in rows.items()]
        lines.append("")
    lines += ["## Recipe (resolved)", "", "```yaml", yaml.safe_dump(meta["config"], sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)


def export_run(hook: Any, ctx: RunContext, nets: Nets, out_dir: Path) -> Path:
    """Ask the run's plugins for the sampling networks and write the export through ``fewstep_export``."""
    names = sorted({n for found in hook.fewstep_sampling_networks(ctx=ctx) for n in (found or [])})
    return hook.fewstep_export(ctx=ctx, nets=nets, out_dir=Path(out_dir), sampling_networks=names)


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """The evaluation block of a run's summary.json (empty when the run was not evaluated)."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()).get("eval", {}) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------
# Reading an export back


@dataclass
class LoadedExport:
    """An export rebuilt for sampling: the run's plugin manager, context and networks."""

    hook: Any
    ctx: RunContext
    nets: Nets
    meta: dict[str, Any]


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a fewstep export: {EXPORT_META} is missing (make one with "
                                "`fewstep export RUN OUT`)")
    return json.loads(path.read_text())


def load_export(folder: str | Path, *, device: str | torch.device | None = None,
                dtype: torch.dtype = torch.float32, modules: dict[str, nn.Module] | None = None) -> LoadedExport:
    """Rebuild the sampling networks of an export with the method's plugin (for ``fewstep sample`` and
    :class:`FewStepPipeline`). ``modules``: components already loaded by diffusers (reused, not reloaded)."""
    from fewstep.backbones import Backbone
    from fewstep.config import validate_config
    from fewstep.diffusion import process_from_scheduler_config
    from fewstep.plugin import build_manager, discover, method_registry
    from fewstep.teacher import Teacher

    folder = Path(folder).expanduser().resolve()
    meta = _read_meta(folder)
    plugins = discover()
    config = validate_config(meta["config"], method_registry(plugins), source=str(folder / EXPORT_META))
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable,
                       plugins=plugins)
    modules = modules or {}
    component = meta["component"]
    if modules.get(component) is not None:
        student = Backbone.wrap(modules[component], folder / component)
    else:
        student = Backbone.from_pretrained(folder / component)
    extra = {name: Backbone.from_pretrained(folder / EXTRA_DIR / name) for name in meta["sampling_networks"]}
    loaded: dict[str, Any] = {}
    for name, (library, default) in {"vae": ("diffusers", "AutoencoderKL"),
                                     "text_encoder": ("transformers", "CLIPTextModel"),
                                     "tokenizer": ("transformers", "CLIPTokenizer")}.items():
        if modules.get(name) is not None:
            loaded[name] = modules[name]
        elif (folder / name).is_dir():
            import importlib

            index = json.loads((folder / "model_index.json").read_text())
            lib, cls = index.get(name, [library, default])
            loaded[name] = getattr(importlib.import_module(lib), cls).from_pretrained(folder / name,
                                                                                       local_files_only=True)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # Sampling needs the teacher's process, VAE and text encoder, never its weights: the stand-in
    # teacher holds the student's network (no second copy).
    standin = Teacher(student, process_from_scheduler_config(meta["process"]), source=Path(meta["teacher"]),
                      device=device, dtype=dtype, **loaded)
    for net in extra.values():
        net.to(device, dtype).eval().requires_grad_(False)
    ctx = RunContext(method=config.method, config=config, device=device, dtype=dtype, run_dir=folder,
                     seed=config.train.seed)
    return LoadedExport(pm.hook, ctx, Nets(standin, student, extra), meta)


def condition(teacher: Any, n: int, class_labels: Any = None, prompt: Any = None) -> Cond | None:
    """The Cond of ``n`` samples for the teacher's conditioning from user inputs (labels or prompts)."""
    if teacher.conditioning == "class":
        if class_labels is None:
            raise ValueError(f"this student is class-conditional ({teacher.num_classes} classes): pass class_labels")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) == 1 and n > 1:
            labels = labels.expand(n)
        if len(labels) != n or bool(((labels < 0) | (labels >= teacher.num_classes)).any()):
            raise ValueError(f"class_labels must be {n} labels in [0, {teacher.num_classes}), got {labels.tolist()}")
        return Cond(labels=labels.to(teacher.device))
    if teacher.conditioning == "text":
        if prompt is None:
            raise ValueError("this student is text-conditional: pass prompt (a string or a list of strings)")
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} samples")
        return teacher.encode_prompts(prompts)
    if class_labels is not None or prompt is not None:
        raise ValueError("this student is unconditional: do not pass class_labels or prompt")
    return None


class FewStepPipeline(DiffusionPipeline):
    """Few-step sampling of a fewstep export with the method's own sampler.

    ``pipe(num_inference_steps=None, batch_size=1, class_labels=None, prompt=None, generator=None,
    latents=None, output_type="pil")``: ``num_inference_steps`` defaults to the export's steps; the batch
    size follows ``class_labels`` / ``prompt`` when given; ``latents`` (B, C, H, W) is the model-space
    noise (drawn from ``generator`` when None; the same generator seeds any noise the sampler adds).
    """

    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer"]

    def __init__(self, scheduler: Any, unet: Any = None, transformer: Any = None, vae: Any = None,
                 text_encoder: Any = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self._loaded: LoadedExport | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> FewStepPipeline:
        """Load an export folder. The folder's ``pipeline_fewstep.py`` only re-exports this class, so loading
        through it needs no trust beyond importing fewstep: ``trust_remote_code`` defaults to True here
        (``DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`` is the diffusers spelling)."""
        kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _export(self) -> LoadedExport:
        device = self.device
        if self._loaded is None or self._loaded.ctx.device != device:
            folder = getattr(self.config, "_name_or_path", None)
            if folder is None:
                raise ValueError("FewStepPipeline must be loaded from an export folder with from_pretrained")
            modules = {k: getattr(self, k, None) for k in ("unet", "transformer", "vae", "text_encoder", "tokenizer")}
            self._loaded = load_export(folder, device=device, dtype=self.dtype, modules=modules)
        return self._loaded

    @torch.no_grad()
    def __call__(self, num_inference_steps: int | None = None, batch_size: int = 1, class_labels: Any = None,
                 prompt: Any = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        from fewstep.sampling import generate

        run = self._export()
        teacher = run.nets.teacher
        steps = num_inference_steps or int(run.meta["steps"])
        if class_labels is not None:
            batch_size = len(torch.as_tensor(class_labels).reshape(-1))
        elif prompt is not None and not isinstance(prompt, str):
            batch_size = len(prompt)
        cond = condition(teacher, batch_size, class_labels, prompt)
        if latents is None:
            latents = torch.randn((batch_size, *teacher.sample_shape), generator=generator)
        images = generate(run.hook, run.ctx, run.nets, latents.to(run.ctx.device).float(), cond, steps,
                          generator=generator)
        images = (images.clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            out: Any = images
        else:
            array = images.permute(0, 2, 3, 1).numpy()
            out = self.numpy_to_pil(array) if output_type == "pil" else array
        return ImagePipelineOutput(images=out) if return_dict else (out,)
