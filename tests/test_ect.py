"""ect plugin: conformance of ``ect`` and ``sct`` on the three backbones and other teachers (maths:
test_ect_maths.py)."""

import pytest

from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_run_config

# stage_nimg 8 with batch 4: the 4-step conformance runs cross a stage (r(t) changes at step 2).
ECT = {"name": "ect", "stage_nimg": 8}


class TestECTConformance(MethodConformance):
    method = ECT


class TestECTDropoutConformance(MethodConformance):
    """ECT's CIFAR-10 recipe: dropout 0.2 (shared by online and target passes), pseudo-Huber, SNR + k weighting."""

    method = {**ECT, "dropout": 0.2, "huber_c": 0.01, "weighting": "snr_k", "mapping": "const"}
    backbones = ("unet",)


class TestSCTConformance(MethodConformance):
    method = {"name": "sct", "stage_nimg": 8}


class TestSCTFullConformance(MethodConformance):
    """Every SCT part at once: stable target over blocks of 2, two segments, edge skipping and a guiding
    snapshot taken half-way (an extra network, so it is checkpointed and restored)."""

    method = {"name": "sct", "stage_nimg": 8, "reference_size": 2, "segment_edges": [1.0], "eta": 0.2,
              "guidance_snapshot": 0.5, "guidance": 1.5}


class TestECTLatentConformance(MethodConformance):
    method = ECT
    backbones = ("unet", "dit")
    teacher_options = {"latent": True}


class TestSCTFlowConformance(MethodConformance):
    method = {"name": "sct", "stage_nimg": 8, "segment_edges": [1.0]}
    backbones = ("unet",)
    teacher_options = {"process": "flow"}


class TestECTEDMConformance(MethodConformance):
    method = ECT
    backbones = ("unet",)
    teacher_options = {"process": "edm"}


def test_segment_edges_must_lie_inside_the_sigma_range(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    with pytest.raises(ValueError, match="segment_edges"):
        run_tiny(tiny_run_config(teacher, {"name": "sct", "segment_edges": [100.0]}), tmp_path / "run")


def test_guidance_needs_a_snapshot():
    from fewstep.config import ConfigError

    with pytest.raises(ConfigError, match="guidance_snapshot"):
        tiny_run_config(None, {"name": "sct", "guidance": 2.0})


def test_reference_size_must_divide_the_micro_batch(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    with pytest.raises(ValueError, match="reference_size"):
        run_tiny(tiny_run_config(teacher, {"name": "sct", "reference_size": 3}), tmp_path / "run")


def test_guided_sct_export_carries_its_snapshot(tmp_path):
    """The guided sampler's weak snapshot travels with the export, which samples like the run."""
    import torch

    from fewstep.export import load_export
    from fewstep.sampling import generate

    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    method = {"name": "sct", "stage_nimg": 4, "guidance_snapshot": 0.5, "guidance": 2.0}
    trainer, _ = run_tiny(tiny_run_config(teacher, method, steps=4), tmp_path / "run")
    loaded = load_export(tmp_path / "run" / "export")
    assert set(loaded.nets.extra) == {"snapshot"}
    noise = torch.randn(2, 1, 8, 8)
    ours = generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, None, 2, seed=1)
    theirs = generate(loaded.hook, loaded.ctx, loaded.nets, noise, None, 2, seed=1)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
