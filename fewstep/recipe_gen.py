"""``fewstep recipe TEACHER --method NAME``: a starting recipe written for one local teacher folder.

The teacher is read from its JSON configs alone (:func:`fewstep.families.detect_family`,
:func:`fewstep.data.teacher_info` and the noise process of its scheduler config; no weights, no diffusers
import): family, conditioning, resolution, channels, latent or pixel, prediction type and noise schedule.
The method section starts from the defaults of the method's own pydantic config (collected through the
``fewstep_method_config`` hook, so a new plugin needs no change here); :data:`RULES` then adjusts fields
*by name*, only where the method's config has a field of that name, and every written field carries a
comment saying where its value comes from. The recipe is validated before it is written, and the method
plugin's ``fewstep_configure`` hook is run on it: a method that trains on teacher pairs gets ``data.pairs``
and the ``fewstep pairs`` command that makes them.

The result is a starting point for the teacher, not a measured recipe: the header says so.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fewstep.diffusion import MAX_X0_GAIN

__all__ = ["KEEP", "RULES", "Rule", "TeacherSummary", "cmd_recipe", "make_recipe", "summarize_teacher"]

#: A VP teacher whose top level has an x0 factor 1/sqrt(alpha_bar_T) above this is called ill-conditioned
#: at its end (DDPM's linear betas: 158; SD's scaled-linear betas: 14.6). A fewstep threshold.
ILL_CONDITIONED_FACTOR = 20.0
#: Top of a consistency-type student's grid on an ill-conditioned VP teacher: CM's / EDM's T = 80 (CM §1).
CONSISTENCY_SIGMA_MAX = 80.0
#: Input level of a one-step generator on an ill-conditioned VP teacher: sigma 2 (VP timestep ~400 on linear
#: betas), as DMD2 SDXL's one-step conditioning timestep 399 (§2.6) and recipes/fashion/dmd2.yaml (measured
#: there: teacher agreement 0.78 against 0.70 at the top level on digits).
GENERATOR_SIGMA_MAX = 2.0
#: Critic updates per generator update proposed for a distribution-matching method whose default is lower (DMD's
#: 1:1): DMD2's two time-scale rule (§2.4); recipes/fashion/dmd.yaml measured it (issue 14, round 6): DMD at 1:1
#: scored FID 101.59 (lr 2e-5) and 143.68 (lr 1e-4, collapsed), at 5:1 with lr 1e-4 32.54 (mean of 2 seeds).
TTUR_RATIO = 5
#: Guidance range drawn per sample by guided distillation of a text teacher: LCM's w in [2, 8]
#: (recipes/families/sd.yaml).
TEXT_GUIDANCE_RANGE = [2.0, 8.0]
#: teacher.guidance of a text teacher (its validation / evaluation rows and methods without their own scale):
#: a fewstep middle value between DMD2's SD1.5 (1.75) and SDXL (8) real-score scales; tune it by eye.
TEXT_TEACHER_GUIDANCE = 4.5
#: teacher.guidance of a guidance-distilled Flux teacher: FluxPipeline's default guidance_scale.
FLUX_GUIDANCE = 3.5
#: method.real_guidance with a weaker checkpoint (``--weak``, autoguidance): on Fashion-MNIST (docs/BENCHMARKS.md,
#: issue 14 round 17) weight 1.5 moved the teacher's 32-step FID 22.81 -> 21.76 (2.0: 25.56) and DMD2's one-step
#: student 27.38 -> 25.87 (2 seeds, 120k images). One teacher's measurement: tune it on yours.
AUTOGUIDANCE_WEIGHT = 1.5


@dataclass(frozen=True)
class TeacherSummary:
    """What a recipe needs to know of a teacher, read from its JSON configs."""

    path: Path
    family: str
    description: str
    conditioning: str  # "none" | "class" | "text"
    num_classes: int | None
    encoders: tuple[str, ...]  # text encoder classes (model_index.json), in component order
    latent: bool
    data_shape: tuple[int, int, int]  # (C, H, W) of the images it generates
    scheduler: str
    process: str  # "vp" | "edm" | "flow"
    prediction_type: str
    num_train_timesteps: int | None
    beta_schedule: str | None
    alpha_bar_T: float | None  # VP: alphas_cumprod at the last training timestep
    x0_factor: float | None  # VP: 1/sqrt(alpha_bar_T), the amplification of eps errors into x0 at the top
    sigma_min: float
    sigma_max: float  # sigma-space levels of the process
    sigma_data: float | None  # EDM
    shift: float | None  # flow
    clip_sample: bool
    clip_sample_range: float | None
    thresholding: bool
    guidance_embeds: bool  # Flux-dev style guidance input
    student_cap: float | None = None  # sigma at which teacher.student_sigma_cap: auto caps a full student
    student_cap_timestep: int | None = None  # its VP timestep

    @property
    def ill_conditioned(self) -> bool:
        """An epsilon- (or v-) predicting VP teacher whose top level amplifies errors into x0 strongly."""
        return self.process == "vp" and (self.x0_factor or 0.0) > ILL_CONDITIONED_FACTOR

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        c, h, w = self.data_shape
        cond = {"none": "unconditional", "class": f"class labels ({self.num_classes} classes)",
                "text": f"text ({', '.join(self.encoders) or 'encoders from model_index.json'})"}[self.conditioning]
        out = [f"family {self.family}: {self.description}",
               f"{'latent' if self.latent else 'pixel'} space, images {c}x{h}x{w}, conditioning {cond}"]
        if self.process == "vp":
            out.append(f"VP ({self.scheduler}), {self.prediction_type} prediction, {self.beta_schedule} betas, "
                       f"{self.num_train_timesteps} timesteps; alpha_bar_T = {self.alpha_bar_T:.3g}, x0 factor "
                       f"1/sqrt(alpha_bar_T) = {self.x0_factor:.3g}; sigma-space levels "
                       f"[{self.sigma_min:.3g}, {self.sigma_max:.3g}]")
        elif self.process == "edm":
            out.append(f"EDM ({self.scheduler}), {self.prediction_type} prediction, sigma in "
                       f"[{self.sigma_min:.3g}, {self.sigma_max:.3g}], sigma_data {self.sigma_data:g}")
        else:
            out.append(f"flow matching ({self.scheduler}), velocity prediction, shift {self.shift:g}, "
                       f"{self.num_train_timesteps} timesteps; sigma-space levels "
                       f"[{self.sigma_min:.3g}, {self.sigma_max:.3g}]")
        clip = (f"clip_sample true (x0 clipped to +-{self.clip_sample_range:g})" if self.clip_sample
                else "clip_sample false")
        out.append(f"{clip}, thresholding {'true' if self.thresholding else 'false'}"
                   + (", guidance embedding (guidance-distilled)" if self.guidance_embeds else ""))
        return out


def summarize_teacher(path: str | Path) -> TeacherSummary:
    """Read a teacher folder's JSON configs; raises FileNotFoundError / FamilyError (a ValueError) for a
    missing or unsupported folder, naming the fix."""
    import json

    from fewstep.data import teacher_info
    from fewstep.diffusion import cap_timestep, process_from_scheduler_config, student_sigma_cap
    from fewstep.families import detect_family

    info = detect_family(path)
    shape = teacher_info(path)
    sched = info.scheduler_config
    process = process_from_scheduler_config(sched)
    denoiser = json.loads((info.denoiser_dir / "config.json").read_text())
    encoders = tuple(str(v[1]) for k, v in sorted(info.index.items())
                     if k.startswith("text_encoder") and isinstance(v, list) and len(v) == 2 and v[1])
    vp = process.kind == "vp"
    alpha_bar = float(process.alphas_cumprod[-1]) if vp else None
    cap = student_sigma_cap(process, "auto")
    return TeacherSummary(
        path=info.root, family=info.family.name, description=info.family.description,
        conditioning=shape.conditioning, num_classes=shape.num_classes, encoders=encoders,
        latent=shape.vae_factor > 1 or (info.root / "vae" / "config.json").is_file(),
        data_shape=tuple(shape.data_shape), scheduler=str(sched.get("_class_name")), process=process.kind,
        prediction_type=process.prediction_type,
        num_train_timesteps=getattr(process, "num_train_timesteps", None),
        beta_schedule=(sched.get("beta_schedule") or process.beta_schedule) if vp else None,
        alpha_bar_T=alpha_bar, x0_factor=1.0 / math.sqrt(alpha_bar) if vp else None,
        sigma_min=float(process.sigma_min), sigma_max=float(process.sigma_max),
        sigma_data=getattr(process, "sigma_data", None) if process.kind == "edm" else None,
        shift=getattr(process, "shift", None) if process.kind == "flow" else None,
        clip_sample=bool(sched.get("clip_sample", False)) and vp,
        clip_sample_range=float(sched.get("clip_sample_range", 1.0)) if sched.get("clip_sample") else None,
        thresholding=bool(sched.get("thresholding", False)),
        guidance_embeds=bool(denoiser.get("guidance_embeds", False)),
        student_cap=cap, student_cap_timestep=None if cap is None else int(cap_timestep(process, cap)),
    )


# ------------------------------------------------------------------------------------------------
# Adjustments of method fields, by field name


@dataclass(frozen=True)
class Rule:
    """Sets the method field ``field`` (only where the method's config has it) to the value that
    ``choose(teacher, model, default)`` (model: the method's config class) returns with its reason; None keeps the method's default silently,
    :data:`KEEP` keeps it with the reason written beside it."""

    field: str
    choose: Callable[[TeacherSummary, type, Any], tuple[Any, str] | None]


#: A rule's value meaning "keep the method's default" (the reason is still written).
KEEP = object()


def _sigma_max(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    if isinstance(default, (int, float)) and default > t.sigma_max:
        return t.sigma_max, f"capped at the teacher's top level {t.sigma_max:.4g} (the method's default is above it)"
    if not t.ill_conditioned:
        if default is not None:
            return None
        if t.process == "flow":
            return KEEP, (f"a flow teacher: the top of its time range, t_max = 1 - 1/N (sigma = t/(1-t) = "
                          f"{t.sigma_max:.4g}); x0 = x_t - t v is well conditioned at every t")
        if t.process == "edm":
            return KEEP, f"the EDM teacher's own range [{t.sigma_min:.3g}, {t.sigma_max:.3g}]"
        return KEEP, (f"the teacher's top level {t.sigma_max:.3g}: its x0 factor {t.x0_factor:.3g} is below "
                      f"{ILL_CONDITIONED_FACTOR:g}, well conditioned")
    top = f"the teacher's top level {t.sigma_max:.3g} (x0 factor {t.x0_factor:.3g})"
    if model.sigma_max_is_generator_input:
        return GENERATOR_SIGMA_MAX, (f"generator input level below the ill-conditioned end: {top} makes the teacher's "
                                     "one-step output the data mean; DMD2 SDXL's one-step timestep 399 and "
                                     "recipes/fashion/dmd2.yaml use sigma ~2")
    if t.sigma_max > CONSISTENCY_SIGMA_MAX:
        capped = ("" if t.student_cap is None else f"; above sigma {t.student_cap:g}, the student's own cap "
                  "(teacher.student_sigma_cap), its network reads every level at the cap's timestep")
        return CONSISTENCY_SIGMA_MAX, (f"top of the student's levels capped at CM's T = 80 inside {top}: the "
                                       f"eps-to-x0 conversion amplifies errors by the level{capped}")
    return None


def _ratio(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    from fewstep.method_configs import DistributionMatchingConfig

    if not (issubclass(model, DistributionMatchingConfig) and isinstance(default, int) and default < TTUR_RATIO):
        return None  # other methods' `ratio` fields mean something else (LADD's discriminator turns, MeanFlow's r != t)
    return TTUR_RATIO, (f"{TTUR_RATIO} fake-score updates per generator update (DMD2's two time-scale rule, §2.4) "
                        f"instead of the method's {default}:1: with 1:1 the fake score lags the generator "
                        "(recipes/fashion/dmd.yaml: FID 101.59 at 1:1 against 32.54 at 5:1)")


def _lcm_grid(t: TeacherSummary) -> bool:
    return t.process == "vp" and t.conditioning == "text"


def _grid(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    return ("teacher", "LCM-style: the teacher's own discrete timesteps for a VP text teacher (LCM, "
            "recipes/families/sd.yaml)") if _lcm_grid(t) else None


def _skip(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    if not _lcm_grid(t):
        return None
    k = max(1, int(t.num_train_timesteps or 1000) // 50)
    return k, f"LCM's skipping step: {t.num_train_timesteps} timesteps / 50 (LCM: 20 of 1000)"


def _solver(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    return ("ddim", "LCM's teacher step on the teacher grid (DDIM equals Euler in sigma space)") \
        if _lcm_grid(t) else None


def _boundary(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    return ("lcm", "LCM's boundary scalings for a VP text teacher (recipes/families/sd.yaml)") \
        if _lcm_grid(t) else None


def _guidance(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    if t.conditioning != "text":
        return None
    return list(TEXT_GUIDANCE_RANGE), ("guided distillation of a text teacher: w drawn per sample from LCM's "
                                       "range [2, 8] and fed to the student's w input")


def _clamp(t: TeacherSummary, model: type, default: Any) -> tuple[Any, str] | None:
    if t.latent or not (t.clip_sample or t.thresholding):
        return None
    what = "clip_sample" if t.clip_sample else "thresholding"
    return True, f"the teacher's scheduler bounds x0 ({what}), so pixel samples are clamped to [-1, 1] too"


#: The adjustments, applied in this order. Each is tried against the method's config and kept only if the
#: method's model accepts the value.
RULES: tuple[Rule, ...] = (
    Rule("sigma_max", _sigma_max),
    Rule("ratio", _ratio),
    Rule("grid", _grid),
    Rule("skip", _skip),
    Rule("solver", _solver),
    Rule("boundary", _boundary),
    Rule("guidance", _guidance),
    Rule("clamp", _clamp),
    Rule("clip", _clamp),
)


# ------------------------------------------------------------------------------------------------
# Recipe assembly


def _value(v: Any) -> str:
    """One YAML scalar or flow collection."""
    return yaml.safe_dump([v], default_flow_style=True, width=10**6).strip()[1:-1]


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 108 - len(indent))]


def _path_for(path: Path, out: Path | None) -> str:
    """``path`` as the recipe writes it: relative to the recipe's folder when near it (at most one level up),
    else absolute."""
    return str(Path(path).resolve()) if out is None else _near(path, Path(out).resolve().parent)


def _near(path: Path, base: Path) -> str:
    rel = os.path.relpath(Path(path).resolve(), base)
    return rel if rel.split(os.sep)[:2].count("..") < 2 else str(Path(path).resolve())


def _from_cwd(path: Path) -> str:
    """``path`` as a command line in the header gives it: relative to the working directory when near it."""
    return _near(path, Path.cwd())


def make_recipe(teacher: str | Path, method: str, *, out: Path | None = None, data: str | None = None,
                prompts: str | None = None, plugins: dict[str, Any] | None = None,
                weak: str | Path | None = None) -> str:
    """The recipe's YAML text for distilling ``teacher`` with ``method``.

    out: where it will be written (paths inside are made relative to its folder; None: absolute). data:
    data.source (None: the digits set, a placeholder). prompts: data.prompts, the captions of a text teacher's
    images. weak: a weaker checkpoint of the same model that autoguides the method's real score
    (``teacher.autoguidance``, ``method.real_guidance`` = AUTOGUIDANCE_WEIGHT), for methods with a real score.
    Raises ValueError / FileNotFoundError / PluginError naming the fix for a missing or unsupported teacher, an
    unknown method, a method that does not distil a teacher, a text teacher without captions, or a weak
    checkpoint that does not match the teacher or a method without a real score to guide.
    """
    from pydantic import ValidationError

    from fewstep.config import ConfigError, validate_config
    from fewstep.plugin import PluginError, _unknown_method_message, build_manager, discover, method_registry
    from fewstep.preflight import _builds_own_teacher

    plugins = discover() if plugins is None else plugins
    registry = method_registry(plugins)
    if method not in registry:
        raise PluginError(_unknown_method_message(method, registry, plugins).replace(
            "method.name:", "--method:") + "; `fewstep plugins` lists them")
    model = registry[method][1]
    if _builds_own_teacher(build_manager(method, plugins=plugins)):
        raise ValueError(f"method {method!r} builds its own network instead of distilling a teacher folder (e.g. "
                         "`diffusion` trains a teacher from data); write its recipe from recipes/digits/teacher.yaml")
    required = [k for k, f in model.model_fields.items() if k != "name" and f.is_required()]
    if required:
        raise ValueError(f"method {method!r} has no defaults for {', '.join(required)} (it does not distil a "
                         "teacher from its configs alone, e.g. `diffusion` trains one from data); write its recipe "
                         "by hand, e.g. from recipes/digits/teacher.yaml")
    t = summarize_teacher(teacher)
    if t.conditioning == "text" and prompts is None and data is None:
        raise ValueError(f"{t.path} is a text-conditional teacher, so the recipe needs captions: pass --prompts "
                         "PROMPTS.txt (one caption per image of --data, default the digits set) or --data with an "
                         "image source that carries captions")
    w = _weak_summary(weak, t, method, model, registry) if weak is not None else None

    defaults = model.model_validate({"name": method}).model_dump(mode="json")
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for rule in RULES:
        if rule.field not in defaults or rule.field in values:
            continue
        chosen = rule.choose(t, model, defaults[rule.field])
        if chosen is None:
            continue
        if chosen[0] is KEEP:
            reasons[rule.field] = chosen[1]
            continue
        try:  # keep a choice only where this method's model accepts it (field names are shared, types may not be)
            model.model_validate({**defaults, **values, rule.field: chosen[0]})
        except ValidationError:  # the method's field of that name means something else
            continue
        values[rule.field], reasons[rule.field] = chosen  # a choice equal to the default keeps its reason
    if w is not None:
        values["real_guidance"] = AUTOGUIDANCE_WEIGHT
        reasons["real_guidance"] = (f"the real score is the teacher autoguided by --weak (teacher.autoguidance, Karras "
                                    f"et al. 2024) at {AUTOGUIDANCE_WEIGHT:g}, the weight measured best on Fashion-MNIST"
                                    " (teacher 22.81 -> 21.76, DMD2 27.38 -> 25.87; 2.0 was worse); tune it on yours")
    method_section = {**defaults, **values}

    c, h, _ = t.data_shape
    source = _path_for(Path(data), out) if data is not None and data != "digits" else "digits"
    data_section: dict[str, Any] = {"source": source, "resolution": h, "channels": c}
    if prompts is not None:
        data_section["prompts"] = _path_for(Path(prompts), out)
    teacher_section: dict[str, Any] = {"pretrained": _path_for(t.path, out)}
    notes = dict(_NOTES)
    if w is not None:
        teacher_section["autoguidance"] = _path_for(w.path, out)
    if t.student_cap is not None and getattr(model, "conditions_student", True):
        teacher_section["student_sigma_cap"] = "auto"
        notes[("teacher", "student_sigma_cap")] = (
            f"auto caps this teacher's full students at sigma {t.student_cap:g} (timestep {t.student_cap_timestep}): "
            f"an epsilon output reaches x0 with gain {t.x0_factor:.0f} at the top level (above "
            f"{MAX_X0_GAIN:g}), so above the cap the student's network is read at the cap's timestep and its x0 "
            f"error is at most {t.student_cap:g}x its output's (docs/CONDITIONING.md; on a stock DDPM teacher "
            "one-step students scored FID 57-92 capped at 2 against 195-1039 at 15); 'none' leaves the student "
            "uncapped (LoRA students always are), a number caps at that level")
    if t.guidance_embeds:
        teacher_section["guidance"] = FLUX_GUIDANCE
    elif t.conditioning == "text":
        teacher_section["guidance"] = TEXT_TEACHER_GUIDANCE
    train = {"total_nimg": 20000 if t.latent else 100000, "batch_size": 8 if t.latent else 32}
    sections = {"method": method_section, "teacher": teacher_section, "data": data_section, "train": train,
                "validation": {"steps": [1, 2, 4], "teacher_steps": 32}}

    def check(pairs: str | None) -> None:
        doc = {**sections, "data": {**data_section, **({"pairs": pairs} if pairs else {})}}
        base = out.resolve().parent if out is not None else Path.cwd()
        try:
            config = validate_config(doc, registry, base_dir=base, source="the generated recipe")
        except ConfigError as exc:  # a default that this module wrote wrongly: a bug, not the user's error
            raise RuntimeError(f"fewstep recipe wrote an invalid recipe: {exc}") from exc
        pm = build_manager(method, disabled=config.plugins.disable, plugins=plugins)
        pm.hook.fewstep_configure(config=config)

    # The method's own cross-field checks (fewstep_configure) decide three things a recipe may lack: teacher
    # pairs (data.pairs, made by `fewstep pairs`), a budget long enough for the method's phases, and core plugins
    # the method asks to disable (the fix its message names, `plugins: {disable: [NAME]}`).
    pairs_path: Path | None = None
    if source == "digits":
        notes[("data", "source")] = ("a placeholder: 'digits' is the embedded scikit-learn set (resized to the "
                                     "teacher's shape); replace it with images like the teacher's (--data)")
    disable: list[str] = []
    for _ in range(8):
        try:
            check(None if pairs_path is None else str(pairs_path))
            break
        except ValueError as exc:
            if "data.pairs" in str(exc) and pairs_path is None:
                pairs_path = (out.resolve().parent if out is not None else Path.cwd()) / f"{t.path.name}-pairs"
                data_section["pairs"] = _path_for(pairs_path, out)
            elif (m := re.search(r"disable: \[(\w+)\]", str(exc))) and m.group(1) not in disable:
                disable.append(m.group(1))
                sections["plugins"] = {"disable": disable}
                notes[("plugins", "disable")] = f"the method asks for it: {exc}"
            elif "train.total_nimg" in str(exc):
                train["total_nimg"] *= 2
                notes[("train", "total_nimg")] = (f"{train['total_nimg']} images: doubled from a first budget until "
                                                  "the method's phases fit in it; extend with --resume")
            else:
                raise ValueError(f"method {method!r} does not apply to {t.path} as generated: {exc}") from exc
    else:
        raise ValueError(f"method {method!r}: no recipe for {t.path} passed the method's checks")
    return _render(t, method, model, method_section, values, reasons, sections, notes, out, prompts, pairs_path, w)


def _weak_summary(weak: str | Path, t: TeacherSummary, method: str, model: type,
                  registry: dict[str, Any]) -> TeacherSummary:
    """The ``--weak`` checkpoint's summary, refused unless the method has a real score to guide and the checkpoint
    makes predictions of the teacher's kind, as far as its JSON configs tell (process, prediction type,
    conditioning, classes, shape); the run's build compares the whole scheduler config too
    (``teacher._check_compatible``)."""
    if "real_guidance" not in model.model_fields:
        guided = sorted(name for name, entry in registry.items() if "real_guidance" in entry[1].model_fields)
        raise ValueError(f"--weak: method {method!r} has no real score to autoguide (method.real_guidance); it "
                         f"applies to {', '.join(guided)}")
    w = summarize_teacher(weak)
    fields = ("process", "prediction_type", "conditioning", "num_classes", "data_shape")
    mismatch = [f"{f} {getattr(w, f)} vs {getattr(t, f)}" for f in fields if getattr(w, f) != getattr(t, f)]
    if mismatch:
        raise ValueError(f"--weak {w.path} does not match the teacher {t.path}: {'; '.join(mismatch)}. Give an "
                         "earlier or smaller checkpoint of the same model (e.g. `fewstep export RUN OUT --checkpoint N` "
                         "of the teacher's own run)")
    return w


_NOTES = {
    ("teacher", "pretrained"): "the teacher folder this recipe was generated for (a relative path resolves against "
                               "this file's folder)",
    ("teacher", "guidance"): "guidance scale of the teacher's validation/evaluation rows and of methods without "
                             "their own scale",
    ("teacher", "autoguidance"): "the weaker checkpoint of the same model (--weak) that guides the real score "
                                 "(method.real_guidance) in place of the null condition",
    ("data", "source"): "the data given with --data (most methods need images; a prompt list alone serves only "
                        "methods that train on the teacher's own samples)",
    ("data", "resolution"): "the teacher's image size (images are resized to it)",
    ("data", "channels"): "the teacher's image channels",
    ("data", "prompts"): "captions of the images, in the source's order (--prompts)",
    ("data", "pairs"): "teacher noise-image pairs this method trains on: make them first (command in the header)",
    ("train", "total_nimg"): "a first budget: watch the validation grids and extend with --resume",
    ("train", "batch_size"): "global batch; lower it if memory runs out",
    ("validation", "steps"): "student step counts of the sample grids",
    ("validation", "teacher_steps"): "teacher row of the grids, for comparison",
}


def _render(t: TeacherSummary, method: str, model: Any, method_section: dict[str, Any], values: dict[str, Any],
            reasons: dict[str, str],
            sections: dict[str, dict[str, Any]], notes: dict[tuple[str, str], str], out: Path | None,
            prompts: str | None, pairs: Path | None, weak: TeacherSummary | None = None) -> str:
    name = str(out) if out is not None else "RECIPE.yaml"
    lines = [f"# Starting recipe: method {method} on the teacher {_from_cwd(t.path)}, written by `fewstep recipe`.",
             "# A STARTING POINT, NOT A MEASURED RECIPE: every value is a default of the method or a choice from the",
             "#   teacher's configs (the comment above each field says which); check the grids and tune.",
             "# Teacher (read from its JSON configs):"]
    for line in t.lines():
        lines += [f"#   {part}" if i == 0 else f"#     {part}" for i, part in enumerate(textwrap.wrap(line, 102))]
    launch = [f"fewstep distill {name}"]
    if pairs is not None:
        given = f" --prompts {_from_cwd(Path(prompts))}" if t.conditioning == "text" and prompts is not None else ""
        if weak is not None:  # the regression's pairs at the real score's guidance (method_configs refuses others)
            given += f" --guidance {method_section['real_guidance']:g} --autoguidance {_from_cwd(weak.path)}"
        launch.insert(0, f"fewstep pairs {_from_cwd(t.path)} {_from_cwd(pairs)} --num 10000{given}")
    lines.append("# Launch:  " + launch[0])
    lines += [f"#          {cmd}" for cmd in launch[1:]]
    for section, body in sections.items():
        lines.append(f"{section}:")
        if section == "method":
            lines.append(f"  name: {method}")
        for key, value in body.items():
            if section == "method":
                if key == "name":
                    continue
                desc = (model.model_fields[key].description or "").strip()
                if key in reasons:
                    kept = "kept for this teacher" if key not in values else "set for this teacher"
                    lines += _comment(f"{kept}: {reasons[key]}. {desc}", "  ")
                else:
                    lines += _comment(f"default: {desc}", "  ")
            elif (section, key) in notes:
                lines += _comment(notes[(section, key)], "  ")
            lines.append(f"  {key}: {_value(value)}")
    return "\n".join(lines) + "\n"


def cmd_recipe(args: Any) -> int:
    """``fewstep recipe``: print or write the recipe."""
    text = make_recipe(args.teacher, args.method, out=args.out, data=args.data, prompts=args.prompts,
                       weak=args.weak)
    if args.out is None:
        print(text, end="")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} (a starting point for {args.teacher}; check it with `fewstep validate {args.out}`)")
    return 0
