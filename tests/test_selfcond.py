"""Self-conditioning (Analog Bits): the core helpers, a self-conditioned teacher trained by the diffusion
plugin and queried downstream, and a self-conditioned consistency student with its sampler."""

import torch

from fewstep import selfcond
from fewstep.backbones import Backbone
from fewstep.diffusion import VPProcess
from fewstep.teacher import load_teacher
from fewstep.testing import MethodConformance, make_tiny_teacher, run_tiny, tiny_run_config, tiny_unet
from fewstep.types import StepInfo


class CountingNet(torch.nn.Module):
    """A self-conditioned backbone that records the estimate each call received."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Backbone(tiny_unet())
        self.net.enable_self_conditioning()
        with torch.no_grad():  # make the estimate channel matter
            self.net.model.conv_in.weight[:, 1:].normal_()
        self.seen: list[torch.Tensor | None] = []
        self.self_conditioning = True

    def forward(self, x, t, cond=None, extra_input=None, **scalars):
        self.seen.append(None if extra_input is None else extra_input.clone())
        return self.net(x, t, cond, extra_input=extra_input, **scalars)


def test_two_pass_feeds_the_first_pass_estimate_and_training_uses_half_the_batch():
    process, net = VPProcess(), CountingNet()
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.5, 1.0, 2.0, 4.0])
    out = selfcond.two_pass(process, net, x, sigma)
    assert net.seen[0] is None and torch.equal(net.seen[1], process.denoise(net.net, x, sigma))
    torch.testing.assert_close(out, process.denoise(net.net, x, sigma, extra_input=net.seen[1]))
    net.seen.clear()
    use = torch.tensor([True, False, True, False])
    est = selfcond.training_estimate(process, net, x, sigma, None, use)
    assert net.seen[0] is None and len(net.seen) == 1             # one first pass, on the used samples only
    assert torch.equal(est[1], torch.zeros_like(est[1])) and torch.equal(est[3], torch.zeros_like(est[3]))
    first = process.denoise(net.net, x[[0, 2]], sigma[[0, 2]])
    torch.testing.assert_close(est[[0, 2]], first)
    step = StepInfo(0, 0, 1, "train", 0.0, 0.0, torch.Generator().manual_seed(0), local_batch=4000, global_batch=4000)
    assert abs(selfcond.mask(step).float().mean().item() - 0.5) < 0.03  # pix2seq's rate


def test_running_estimate_feeds_the_previous_output():
    calls = []

    def fn(x, sigma, estimate):
        calls.append(estimate)
        return x * 0 + sigma.view(-1, 1, 1, 1)

    f = selfcond.RunningEstimate(fn, clip=True)
    x = torch.zeros(2, 1, 2, 2)
    f(x, torch.tensor([5.0, 5.0]))
    f(x, torch.tensor([0.5, 0.5]))
    assert calls[0] is None and torch.equal(calls[1], torch.ones(2, 1, 2, 2))  # clipped to [-1, 1]


def test_self_conditioned_teacher_pretraining_and_use_downstream(tmp_path):
    """method diffusion with self_condition: trains, exports a teacher whose prediction is the two-pass
    function and whose sampler runs on a running estimate; a CD student of it is self-conditioned."""
    method = {"name": "diffusion", "self_condition": True, "backbone": {"block_out_channels": [16, 32],
              "attention_levels": [], "norm_num_groups": 8}}
    config = tiny_run_config(None, method, steps=3, data={"resolution": 8, "channels": 1},
                             validation={"teacher_steps": None, "steps": [2]})
    trainer, rec = run_tiny(config, tmp_path / "teacher")
    assert trainer.nets.student.self_conditioning and all(torch.isfinite(torch.tensor(v)) for v in rec.logs[-1].values())
    teacher = load_teacher(tmp_path / "teacher" / "export")
    assert teacher.net.self_conditioning and teacher.net.extra_channels == 1
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 3.0])
    two = selfcond.two_pass(teacher.process, teacher.net, x, sigma, clip=True)
    torch.testing.assert_close(teacher.denoise(x, sigma), two)
    assert torch.isfinite(teacher.sample(torch.randn(2, 1, 8, 8), num_steps=3)).all()
    student, _ = run_tiny(tiny_run_config(tmp_path / "teacher" / "export", {"name": "cd", "num_scales": 4}, steps=2),
                          tmp_path / "cd")
    assert student.nets.student.self_conditioning
    assert torch.isfinite(student.validate()["student 2 steps"]).all()


def test_self_conditioned_student_sampler_reads_its_previous_output(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "t", "unet")
    trainer, _ = run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 4, "self_condition": True}, steps=2),
                          tmp_path / "run")
    net = trainer.nets.ema
    assert net.self_conditioning and net.extra_channels == 1
    seen = []
    handle = net.model.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 1:].clone()))
    trainer.validate()
    handle.remove()
    # 1-step row: one call with zeros; 2-step row: zeros, then the (clamped) first output
    assert torch.equal(seen[0], torch.zeros_like(seen[0])) and seen[2].abs().sum() > 0


class TestSelfConditionedCDConformance(MethodConformance):
    method = {"name": "cd", "num_scales": 4, "self_condition": True}
    backbones = ("unet", "dit")
