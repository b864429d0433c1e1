"""CLI: lazy imports, and the quickstart recipe end to end at a reduced size."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from fewstep import cli

ROOT = Path(__file__).parents[1]


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "sklearn", "pandas", "numpy", "PIL")


def test_help_does_not_import_heavy_libraries():
    code = f"import sys, fewstep.cli as c; c.build_parser(); print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_validate_and_plugins_import_no_heavy_library():
    """Discovery reads the plugins' config modules only and validate's checks read JSON (docs/SPEED.md
    "Start-up"), so neither command imports torch, diffusers or scikit-learn."""
    code = ("import sys, fewstep.cli as c\n"
            "assert c.main(['validate', 'recipes/digits/cd.yaml']) == 0\n"
            "assert c.main(['validate', 'recipes/digits/teacher.yaml']) == 0\n"  # a plugin building its own teacher
            "assert c.main(['plugins']) == 0\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "recipes/digits/cd.yaml: ok (method 'cd'" in out and "not imported" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_quickstart_recipe_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", str(ROOT / "recipes/digits/cd.yaml"), "--run-dir", str(run),
            "--set", "train.total_nimg=64", "--set", "train.batch_size=16", "--set", "train.progress_bar=false",
            "--set", "validation.teacher_steps=4", "--set", "validation.every_nimg=null",
            "--set", "train.log_every_nimg=32"]
    assert cli.main(args) == 0
    grid = Image.open(run / "samples" / "latest.png")
    assert grid.size[0] > grid.size[1] > 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["nimg"] for line in lines] == [32, 64]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "cd" and summary["nimg"] == 64
    assert (run / "export" / "unet" / "config.json").is_file() and (run / "export" / "model_index.json").is_file()
    assert (run / "config.yaml").is_file()
    # a second start without --resume refuses to overwrite; --resume with nothing left to do finishes
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*args, "--resume"]) == 0
    # sample from the run folder
    out = tmp_path / "s.png"
    assert cli.main(["sample", str(run), "--steps", "1", "--num", "4", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    small = tmp_path / "small.png"  # --set changes the run's recipe for this command only
    assert cli.main(["sample", str(run), "--steps", "1", "--num", "4", "--out", str(small),
                     "--set", "validation.upscale=1"]) == 0
    assert Image.open(small).size[1] < Image.open(out).size[1]


def test_validate_runs_the_methods_cross_field_checks(tmp_path, capsys):
    """`validate` refuses what the method's fewstep_configure refuses at the start of distill (here: guided's
    stages longer than the run), instead of saying ok."""
    recipe = Path(__file__).parents[1] / "recipes" / "digits" / "guided.yaml"
    assert cli.main(["validate", str(recipe), "--skip-inputs", "--set", "train.total_nimg=8"]) == 2
    err = capsys.readouterr().err
    assert "train.total_nimg=8" in err and "raise train.total_nimg" in err and "Traceback" not in err
