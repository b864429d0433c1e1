"""Launcher settings against the recipe (fewstep.distributed, docs/DISTRIBUTED.md): a conflicting mixed precision
is refused, never overridden; which networks accelerate prepares (sharded under FSDP / ZeRO-3) and which stay
replicated. FSDP itself does not run on CPU (accelerate only enables it for accelerator devices)."""

import json

import pytest
import yaml

from fewstep.cli import main
from fewstep.distributed import LaunchConflict, check_engine, check_mixed_precision, engine, sharding_plan
from fewstep.testing import make_tiny_teacher, tiny_run_config


@pytest.mark.parametrize(("recipe", "env", "refused"), [
    ("no", {}, False),
    ("bf16", {"ACCELERATE_MIXED_PRECISION": "no"}, False),  # "no" is also accelerate's unset default
    ("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}, False),
    ("no", {"ACCELERATE_MIXED_PRECISION": "bf16"}, True),
    ("fp16", {"ACCELERATE_MIXED_PRECISION": "bf16"}, True),
])
def test_accelerate_config_precision(recipe, env, refused):
    if refused:
        with pytest.raises(LaunchConflict, match=rf"'{recipe}' in the recipe but the accelerate config"):
            check_mixed_precision(recipe, env)
    else:
        check_mixed_precision(recipe, env)


@pytest.mark.parametrize(("section", "refused"), [({"bf16": {"enabled": True}}, True),
                                                  ({"bf16": {"enabled": "auto"}}, False),
                                                  ({"fp16": {"enabled": False}}, False)])
def test_deepspeed_config_precision(tmp_path, section, refused):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, **section}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    if refused:
        with pytest.raises(LaunchConflict, match=r"DeepSpeed config .*bf16.enabled.*--set train.mixed_precision=bf16"):
            check_mixed_precision("no", env)
    else:
        check_mixed_precision("no", env)


def test_engine():
    assert engine({}) == "ddp"
    assert engine({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    assert engine({"ACCELERATE_USE_DEEPSPEED": "true"}) == "deepspeed"


@pytest.mark.parametrize(("env", "refused"), [
    ({}, None),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP2"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
])
def test_engines_that_shard_parameters_are_refused(env, refused):
    if refused is None:
        check_engine(env)
    else:
        with pytest.raises(LaunchConflict, match=rf"^{refused} keeps the student's parameters sharded.*ZeRO-2"):
            check_engine(env)


def test_zero_stage_from_the_deepspeed_config(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(LaunchConflict, match="ZeRO-3"):
        check_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), "unet")


def test_plan_matches_what_the_trainer_prepares(teacher, tmp_path):
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    config = tiny_run_config(teacher, {"name": "cd", "target_ema": 0.9})
    trainer = Trainer(config, build_manager("cd"), tmp_path / "run")
    trainer.setup()
    trainable = {n for g in trainer.groups.values() for n in g.modules}
    plan = sharding_plan(trainable, trainer.nets.names())
    assert plan == {"teacher": "replicated", "student": "prepared", "ema": "replicated", "target": "replicated"}
    assert set(trainer.wrapped) == {n for n, p in plan.items() if p == "prepared"}  # what accelerate wraps


def test_cli_refuses_a_conflicting_launch(teacher, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "cd.yaml"
    recipe.write_text(yaml.safe_dump(tiny_run_config(teacher, {"name": "cd"}).dump()))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert main(["distill", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.mixed_precision is 'no' in the recipe but the accelerate config" in err and "Traceback" not in err
