"""kd plugin: conformance on the UNet and DiT tiny teachers with a pair store made for each, the closed form of
its target (zero loss and zero gradient when the student is the pair map, the L2 gradient otherwise), the
inputs of the multistep variant, and the configuration error without a pair store."""

from __future__ import annotations

import pytest
import torch
from fewstep_plugins.kd import kd_loss, student_levels

from fewstep.diffusion import VPProcess
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_pairs, tiny_run_config


class TestKDConformance(MethodConformance):
    method = {"name": "kd"}
    backbones = ("unet", "dit")
    steps = 3

    def config(self, teacher, **sections):
        sections["data"] = {**sections.get("data", {}), "pairs": str(tiny_pairs(teacher))}
        return super().config(teacher, **sections)


def linear_student(a: torch.Tensor):
    """D(x, s) = a·x/s: at the coupling's input s_0·z its sample is a·z."""
    return lambda x, s: a * x / s.view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["l2", "pseudo_huber"])
def test_loss_and_gradient_vanish_when_the_student_is_the_pair_map(kind):
    torch.manual_seed(0)
    z = torch.randn(5, 1, 4, 4)
    levels = torch.tensor([64.0])  # a power of two: s_0·z/s_0 is z exactly
    k = torch.zeros(5, dtype=torch.long)
    a = torch.tensor(0.7, requires_grad=True)
    loss = kd_loss(linear_student(a), z, 0.7 * z, levels, k, torch.randn_like(z), kind)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.grad, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_l2_gradient_is_the_regression_residual():
    """d/da mean((a z − y)²) = 2 mean((a z − y) z) per sample."""
    torch.manual_seed(1)
    z, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    a = torch.tensor(0.3, requires_grad=True)
    loss = kd_loss(linear_student(a), z, y, torch.tensor([10.0]), torch.zeros(3, dtype=torch.long),
                   torch.randn_like(z), "l2")
    torch.testing.assert_close(loss, (0.3 * z - y).square().flatten(1).mean(1))
    loss.sum().backward()
    torch.testing.assert_close(a.grad, (2 * (0.3 * z - y) * z).flatten(1).mean(1).sum())


def test_multistep_inputs_are_the_coupling_or_noised_teacher_images():
    seen = []

    def student(x, s):
        seen.append((x.clone(), s.clone()))
        return x

    z, y, eps = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    levels = torch.tensor([80.0, 5.0, 1.0])
    k = torch.tensor([0, 1, 2, 0])
    kd_loss(student, z, y, levels, k, eps, "l2")
    x, s = seen[0]
    torch.testing.assert_close(s, torch.tensor([80.0, 5.0, 1.0, 80.0]))
    expected = torch.stack([80 * z[0], y[1] + 5 * eps[1], y[2] + eps[2], 80 * z[3]])
    torch.testing.assert_close(x, expected)


def test_levels_start_where_the_pairs_ode_starts():
    process = VPProcess()
    levels = student_levels(process, 4)
    assert levels[0] == process.sampling_sigmas(16)[0]
    assert torch.all(levels[1:] < levels[:-1])


def test_kd_needs_a_pair_store_and_trains_multistep(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    with pytest.raises(ValueError, match="fewstep pairs"):
        run_tiny(tiny_run_config(teacher, {"name": "kd"}, steps=1), tmp_path / "a")
    config = tiny_run_config(teacher, {"name": "kd", "num_steps": 4}, steps=3, data={"pairs": str(tiny_pairs(teacher))},
                             validation={"steps": [1, 4]})
    trainer, rec = run_tiny(config, tmp_path / "b")
    assert all(0.0 <= log["student/coupled"] <= 1.0 for log in rec.logs)
    assert all(torch.isfinite(x).all() for x in trainer.validate().values())
