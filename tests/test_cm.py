"""cm plugin: conformance on the three backbones and its maths against closed forms (maths: test_cm_maths.py)."""

import pytest
import torch

from fewstep.testing import MethodConformance


class TestCDConformance(MethodConformance):
    method = {"name": "cd", "num_scales": 8}


class TestCDGuidedConformance(MethodConformance):
    method = {"name": "cd", "num_scales": 8, "guidance": [1.0, 3.0], "target_ema": 0.9}
    backbones = ("unet_condition", "dit")


class TestCTConformance(MethodConformance):
    method = {"name": "ct", "s0": 2, "s1": 10}


class TestICTConformance(MethodConformance):
    method = {"name": "ict", "s0": 2, "s1": 16}


class TestLCMConformance(MethodConformance):
    """LCM-style CD: the teacher's timestep grid every k steps, DDIM solver, LCM scalings, w input."""

    method = {"name": "cd", "grid": "teacher", "skip": 100, "solver": "ddim", "boundary": "lcm",
              "guidance": [2.0, 6.0], "target_ema": 0.95}
    backbones = ("unet_condition", "dit")
    families = ("sd", "sdxl", "pixart_sigma")  # LCM scalings need a VP teacher; SD3, Flux, Sana are flow teachers


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_lcm_options_need_a_vp_teacher(tmp_path, process):
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "t", "unet", process=process)
    with pytest.raises(ValueError, match="VP"):
        run_tiny(tiny_run_config(teacher, {"name": "cd", "grid": "teacher"}), tmp_path / "run")


class TestCDLatentConformance(MethodConformance):
    """A latent teacher: data are encoded by the teacher's VAE (cached), samples decoded."""

    method = {"name": "cd", "num_scales": 8}
    backbones = ("unet", "dit")
    teacher_options = {"latent": True}


class TestCTFlowConformance(MethodConformance):
    """CT on a flow-matching teacher (sigma-space view of the rectified-flow process)."""

    method = {"name": "ct", "s0": 2, "s1": 10}
    backbones = ("unet",)
    teacher_options = {"process": "flow"}


class TestICTEDMConformance(MethodConformance):
    method = {"name": "ict", "s0": 2, "s1": 16}
    backbones = ("unet",)
    teacher_options = {"process": "edm"}


def test_guided_cd_of_an_unconditional_teacher_needs_autoguidance(tmp_path):
    """LCM-style guided CD on an unconditional teacher: refused with CFG only, works with autoguidance."""
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    weak = make_tiny_teacher(tmp_path / "weak", "unet", seed=1)
    method = {"name": "cd", "num_scales": 4, "guidance": [1.0, 2.0]}
    with pytest.raises(ValueError, match="teacher.autoguidance"):
        run_tiny(tiny_run_config(teacher, method, steps=1), tmp_path / "cfg")
    trainer, rec = run_tiny(tiny_run_config(teacher, method, steps=2, teacher={"autoguidance": str(weak)}),
                            tmp_path / "auto")
    assert trainer.nets.teacher.autoguided and "w" in trainer.nets.student.extra_scalars
    assert all(torch.isfinite(torch.tensor(log["student/loss"])) for log in rec.logs)
