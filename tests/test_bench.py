"""Speed work of issue 15: `fewstep bench` reports, the cached EMA lists and backbone dtype, device-side draws
and `train.compile` with its eager fallback."""

import copy
import json

import pytest
import torch

from fewstep.cli import main
from fewstep.compiling import compile_backbones
from fewstep.nn import ema_update
from fewstep.testing import make_tiny_teacher, tiny_run_config
from fewstep.types import StepInfo


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), "unet")


@pytest.fixture()
def backbone(teacher_dir):
    from fewstep.teacher import load_teacher

    return load_teacher(teacher_dir).net


def test_bench_report(teacher_dir, tmp_path):
    from fewstep.bench import bench
    from fewstep.plugin import build_manager

    config = tiny_run_config(teacher_dir, {"name": "cd", "num_scales": 6})
    report = bench(config, build_manager("cd"), warmup=1, steps=2, run_dir=tmp_path / "run", peak=1.0)
    split = report["split_s_per_step"]
    assert {"data", "teacher forward", "student forward", "backward", "optimizer", "hooks"} <= set(split)
    assert all(split[k] > 0 for k in ("teacher forward", "student forward", "backward", "optimizer"))
    # the parts add up to the timed pass's step time (the rest is the trainer's own work)
    assert sum(split.values()) == pytest.approx(report["split_pass_step_s"], rel=1e-6)
    assert report["images_per_s"] == pytest.approx(4 / report["step_s"])
    assert report["flops_per_step"] > 0 and report["mfu"] == pytest.approx(report["achieved_tflops"] / 1.0)
    # 4 UNet passes of which one has a backward (about 2 forwards): more than 4 forwards' FLOPs
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(backbone_of(teacher_dir))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.randn(4, 1, 8, 8), torch.full((4,), 500.0))
    assert 4 * fc.get_total_flops() < report["flops_per_step"] < 8 * fc.get_total_flops()


def backbone_of(teacher_dir):
    from fewstep.teacher import load_teacher

    return load_teacher(teacher_dir).net


def test_bench_cli_writes_json(teacher_dir, tmp_path, capsys):
    import yaml

    recipe = tmp_path / "cd.yaml"
    recipe.write_text(yaml.safe_dump(tiny_run_config(teacher_dir, {"name": "cd"}).dump()))
    assert main(["bench", str(recipe), "--steps", "1", "--warmup", "1", "--plain", "--out", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["split_s_per_step"] is None and report["images_per_s"] > 0
    assert "images/s" in capsys.readouterr().out


def test_ema_update_matches_the_closed_form(backbone):
    student, ema = copy.deepcopy(backbone), copy.deepcopy(backbone).requires_grad_(False)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    for beta in (0.9, 0.5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        expected = {k: beta * start[k] + (1 - beta) * v for k, v in student.state_dict().items()
                    if v.is_floating_point()}
        ema_update(ema, student, beta)  # the second call reuses the cached lists
        for k, v in expected.items():
            torch.testing.assert_close(ema.state_dict()[k], v)
        start = {k: v.clone() for k, v in ema.state_dict().items()}


def test_model_dtype_follows_to(backbone):
    assert backbone.model_dtype == torch.float32
    backbone.to(torch.bfloat16)
    assert backbone.model_dtype == torch.bfloat16 == backbone.model.dtype
    wrapper = torch.nn.Sequential(backbone).float()  # a parent's .float() reaches the backbone's _apply
    assert backbone.model_dtype == torch.float32 and wrapper[0] is backbone


def test_device_generator_draws_and_replays():
    def info(device_generator):
        return StepInfo(step=0, nimg=0, total_nimg=8, phase="p", phase_progress=0.0, progress=0.0,
                        generator=torch.Generator().manual_seed(1), global_batch=4, local_batch=2, offset=2,
                        device_generator=device_generator)

    a = info(torch.Generator().manual_seed(7)).randn(3)
    b = info(torch.Generator().manual_seed(7)).randn(3)
    full = torch.randn((4, 3), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, full[2:4])  # rows 2..3 of the global batch's draw
    assert torch.equal(info(None).randn(3), torch.randn((4, 3), generator=torch.Generator().manual_seed(1))[2:4])


def test_compile_keeps_outputs_and_names(backbone):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0])
    eager = backbone(x, t)
    keys = list(backbone.state_dict())
    assert compile_backbones({"student": backbone}, backend="eager") == ["student"]
    torch.testing.assert_close(backbone(x, t), eager)
    assert list(backbone.state_dict()) == keys  # checkpoints and exports see the same names


def test_compile_failure_falls_back_to_eager(backbone, capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernel for this")

    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0])
    eager = backbone(x, t)
    compile_backbones({"teacher": backbone}, backend=broken_backend)
    torch.testing.assert_close(backbone(x, t), eager)
    err = capsys.readouterr().err
    assert "torch.compile failed on teacher (UNet2DModel" in err and "runs eagerly" in err
    torch.testing.assert_close(backbone(x, t), eager)  # eager from now on: no second message
    assert "torch.compile failed" not in capsys.readouterr().err
