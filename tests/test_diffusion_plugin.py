"""diffusion plugin (teacher pretraining): conformance when fine-tuning, and training from scratch."""

import pytest
import torch

from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, run_tiny, tiny_run_config


class TestDiffusionConformance(MethodConformance):
    method = {"name": "diffusion", "solver": "euler"}


class TestDiffusionFlowConformance(MethodConformance):
    method = {"name": "diffusion", "solver": "euler"}
    backbones = ("unet",)
    teacher_options = {"process": "flow"}


@pytest.mark.parametrize("kind, prediction", [("vp", "epsilon"), ("vp", "v_prediction"), ("edm", None), ("flow", None)])
def test_from_scratch_learns_and_exports_a_loadable_teacher(tmp_path, kind, prediction):
    method = {"name": "diffusion", "solver": "euler",
              "backbone": {"block_out_channels": [16, 32], "attention_levels": [1], "num_classes": 10},
              "process": {"kind": kind, "prediction_type": prediction}}
    config = tiny_run_config(None, method, steps=12, batch=16, data={"resolution": 8, "channels": 1},
                             optimizer={"lr": 1e-3})
    trainer, rec = run_tiny(config, tmp_path / "run")
    losses = [log["student/loss"] for log in rec.logs]
    assert sum(losses[-4:]) < sum(losses[:4]), losses  # it learns
    teacher = load_teacher(tmp_path / "run" / "export")
    assert teacher.process.kind == kind and teacher.conditioning == "class" and teacher.num_classes == 10
    out = teacher.sample(torch.randn(2, 1, 8, 8), trainer.validation_inputs()[1].index(slice(0, 2)), num_steps=2,
                         solver="euler")
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_from_scratch_needs_resolution_and_channels(tmp_path):
    config = tiny_run_config(None, {"name": "diffusion"})
    with pytest.raises(ValueError, match="data.resolution and data.channels"):
        run_tiny(config, tmp_path / "run")
