"""Recipe validation: one clear message per bad field, overrides, resolved-config dump, exit code 2."""

import pytest
import yaml

from fewstep import cli
from fewstep.config import ConfigError, apply_overrides, load_config, write_resolved

GOOD = {
    "method": {"name": "cd", "num_scales": 10},
    "teacher": {"pretrained": "teacher"},
    "train": {"total_nimg": 64, "batch_size": 8},
}


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_recipe_resolves_paths_against_its_folder(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.method.name == "cd" and cfg.method.num_scales == 10
    assert cfg.teacher.pretrained == (tmp_path / "teacher").resolve()
    assert cfg.data.source == "digits"


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), ["train.batch_size=16", "method.guidance=null",
                                               "validation.steps=[1, 4]", "method.solver=euler"])
    assert cfg.train.batch_size == 16 and cfg.validation.steps == [1, 4] and cfg.method.solver == "euler"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"a": 1}, ["a.b=2"])


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"train": {"total_nimg": 64, "batch_size": -1}}, ["train.batch_size", "greater than 0", "got -1"]),
        ({"train": {"total_nimg": 64, "batch_size": 8, "mixed_precison": "bf16"}},
         ["train.mixed_precison: unknown field", "did you mean 'mixed_precision'", "allowed fields"]),
        ({"train": {"total_nimg": 64, "batch_size": 8, "mixed_precision": "fp8"}},
         ["train.mixed_precision", "'no', 'bf16' or 'fp16'", "got 'fp8'"]),
        ({"method": {"name": "cd", "solver": "rk4"}}, ["method.solver", "'euler', 'heun' or 'ddim'", "got 'rk4'"]),
        ({"method": {"name": "cd", "num_scale": 4}}, ["method.num_scale: unknown field", "did you mean 'num_scales'"]),
        ({"method": {"name": "cdd"}}, ["unknown method 'cdd'", "did you mean 'cd'"]),
        ({"method": {"name": "ct", "mu0": 1.5}}, ["method.mu0", "less than 1", "got 1.5"]),
    ],
)
def test_bad_fields_name_field_value_and_allowed(tmp_path, patch, expected):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, {**GOOD, **patch}))
    for text in expected:
        assert text in str(info.value)


def test_several_errors_are_reported_together(tmp_path):
    bad = {**GOOD, "train": {"total_nimg": 0, "batch_size": 0}, "method": {"name": "cd", "rho": -1}}
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, bad))
    msg = str(info.value)
    assert "train.total_nimg" in msg and "train.batch_size" in msg and "method.rho" in msg


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), ["method.target_ema=0.5"])
    out = write_resolved(cfg, tmp_path / "run")
    again = load_config(out)
    assert again.dump() == cfg.dump()


def test_cli_bad_recipe_exits_2_without_traceback(tmp_path, capsys):
    path = _write(tmp_path, {**GOOD, "train": {"total_nimg": 64, "batch_size": "many"}})
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "'many'" in err and "Traceback" not in err
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 2


def test_cli_validate_accepts_the_shipped_recipes(capsys):
    import pathlib

    recipes = sorted(pathlib.Path(__file__).parents[1].joinpath("recipes").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert cli.main(["validate", str(recipe), "--skip-inputs"]) == 0, recipe  # some inputs are made by other recipes


def test_unquoted_yaml_no_is_mixed_precision_no():
    """YAML 1.1 reads `mixed_precision: no` (and `--set train.mixed_precision=no`) as false; it means "no"."""
    from fewstep.config import TrainConfig

    assert TrainConfig(total_nimg=8, batch_size=4, mixed_precision=False).mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(total_nimg=8, batch_size=4, mixed_precision=True)
