"""fewstep compare: the table and plot of evaluated runs, and the refusals that keep FIDs comparable."""

import json

import pytest
import yaml
from PIL import Image

from fewstep import cli
from fewstep.compare import compare_runs


def _run(root, name, method="cd", teacher="/teachers/a", num=1000, fids=(50.0, 40.0, 45.0), guidance=1.0,
         teacher_fid=10.0, seed=0, lr=1e-4):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method},
                                                     "teacher": {"pretrained": teacher, "guidance": guidance},
                                                     "train": {"seed": seed, "total_nimg": 100},
                                                     "optimizer": {"lr": lr}}))
    row = lambda fid: {"fid": fid, "precision": 0.5, "recall": 0.25, "samples_per_s": 100.0}  # noqa: E731
    evaluation = {"num": num, "reference": "fashion: 60000 images", "features": "inception.pt",
                  "teacher 32 steps": row(teacher_fid), **{f"student {k} step" + ("s" if k > 1 else ""): row(f)
                                                    for k, f in zip((1, 2, 4), fids)}}
    summary = {"method": method, "nimg": 60000, "wall_time_s": 600.0, "peak_memory_mb": 512.0, "eval": evaluation}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_table_and_plot(tmp_path):
    runs = [_run(tmp_path, "cd"), _run(tmp_path, "ctm", "ctm", fids=(30.0, 20.0, 15.0))]
    table = compare_runs(runs, tmp_path / "out")
    lines = table.splitlines()
    assert "| teacher | – | 32 | 10.00 |" in table
    assert "| ctm | ctm | 4 | 15.00 | 0.500 | 0.250 | 60,000 | 10.0 min | 512 MB | 100.0 |" in lines
    assert sum(line.startswith("| cd |") for line in lines) == 3
    assert (tmp_path / "out" / "compare.md").read_text() == table
    assert Image.open(tmp_path / "out" / "compare.png").size[0] > 100


def test_a_guided_teacher_gets_its_own_row(tmp_path):
    runs = [_run(tmp_path, "guided", "guided", guidance=1.5, teacher_fid=30.0), _run(tmp_path, "cd")]
    lines = compare_runs(runs).splitlines()
    teacher_rows = [line for line in lines if line.startswith("| teacher")]
    assert teacher_rows[0].startswith("| teacher | – | 32 | 10.00 |")  # the unguided teacher first
    assert teacher_rows[1].startswith("| teacher, CFG 1.5 | – | 32 | 30.00 |")


def test_refuses_runs_of_different_teachers_or_protocols(tmp_path, capsys):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", teacher="/teachers/b")
    c = _run(tmp_path, "c", num=500)
    assert cli.main(["compare", str(a), str(b)]) == 2
    assert "different teachers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="different protocols"):
        compare_runs([a, c])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "cd"}, "teacher": {}}))
    with pytest.raises(ValueError, match="fewstep eval"):
        compare_runs([a, tmp_path / "d"])


def test_training_seeds_of_one_recipe_get_a_mean_and_spread(tmp_path):
    runs = [_run(tmp_path, "cd", fids=(50.0, 40.0, 45.0)), _run(tmp_path, "cd-seed1", fids=(54.0, 38.0, 47.0), seed=1),
            _run(tmp_path, "cd-lr", fids=(10.0, 10.0, 10.0), lr=1e-3),  # another recipe: not averaged in
            _run(tmp_path, "ctm", "ctm", fids=(30.0, 20.0, 15.0))]
    lines = compare_runs(runs).splitlines()
    seed_rows = lines[lines.index("| method | runs | seeds | steps | FID mean | FID spread | precision mean | "
                                  "recall mean |") + 2:]
    assert seed_rows == ["| cd | cd, cd-seed1 | 0, 1 | 1 | 52.00 | 50.00 – 54.00 | 0.500 | 0.250 |",
                         "| cd | cd, cd-seed1 | 0, 1 | 2 | 39.00 | 38.00 – 40.00 | 0.500 | 0.250 |",
                         "| cd | cd, cd-seed1 | 0, 1 | 4 | 46.00 | 45.00 – 47.00 | 0.500 | 0.250 |"]


def test_no_seed_table_without_replicates(tmp_path):
    table = compare_runs([_run(tmp_path, "cd"), _run(tmp_path, "cd-lr", lr=1e-3)])
    assert "Across training seeds" not in table
