"""The GPU-clean step's bookkeeping (fewstep.steplog): a non-finite step skipped on the device leaves weights
and optimizer state untouched, logs are window means read once, and the trainer reads nothing from the
device between logging windows."""

import pytest
import torch

from fewstep.steplog import StepLog, gated_step, grad_norm, step_gated
from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config
from fewstep.trainer import Trainer, make_optimizer
from fewstep.types import OptimizerGroup

B = 4


def _state(opt):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state_dict()["state"][0].items()}


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_skipped_step_leaves_weights_and_optimizer_state_untouched(name):
    p = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = make_optimizer(OptimizerGroup("g", ("student",), lr=1e-2, optimizer=name, weight_decay=0.1), [p])
    assert step_gated(opt)
    ref_p = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.SGD([ref_p], lr=1e-2, momentum=0.9, weight_decay=0.1) if name == "sgd" else \
        {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]([ref_p], lr=1e-2, weight_decay=0.1)
    for grad in (torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)):
        p.grad, ref_p.grad = grad.clone(), grad.clone()
        gated_step(opt, torch.tensor(False))
        ref.step()
    torch.testing.assert_close(p, ref_p, rtol=1e-12, atol=1e-12)  # fused equals torch's default implementation
    before, weights = _state(opt), p.detach().clone()
    p.grad = torch.full((7,), float("nan"), dtype=torch.float64)
    gated_step(opt, torch.tensor(True))
    assert torch.equal(p, weights)
    after = _state(opt)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_radam_is_not_fused_and_reads_the_flag_on_the_host():
    p = torch.nn.Parameter(torch.randn(3))
    opt = make_optimizer(OptimizerGroup("g", ("student",), lr=1e-2, optimizer="radam"), [p])
    assert not step_gated(opt)
    p.grad, weights = torch.ones(3), p.detach().clone()
    gated_step(opt, torch.tensor(True))
    assert torch.equal(p, weights) and not opt.state
    gated_step(opt, torch.tensor(False))
    assert not torch.equal(p, weights)


def test_grad_norm_is_the_total_norm():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(())]
    expected = torch.cat([t.flatten() for t in tensors]).norm()
    torch.testing.assert_close(grad_norm(tensors), expected)


def _add(log, step, loss, norm=1.0, group="g"):
    values = {"loss": torch.tensor(loss), "grad_norm": torch.tensor(norm)}
    bad, skip = log.guard(values["loss"], values["grad_norm"])
    log.add(group, step, values, {"lr": 0.5}, bad, skip)
    return bool(skip)


def test_window_means_skip_non_finite_steps_and_count_them():
    log = StepLog(torch.device("cpu"), budget=5, reduce=lambda t: t)
    skips = [_add(log, 0, 1.0), _add(log, 1, float("nan")), _add(log, 2, 3.0, norm=float("inf")), _add(log, 3, 5.0)]
    assert skips == [False, True, True, False]
    found = log.read()
    assert found.nonfinite == 2 and found.first[:2] == ("g", 1) and log.budget == 3
    means = log.window()
    assert means == {"g/loss": 3.0, "g/grad_norm": 1.0, "g/lr": 0.5, "g/skipped": 2.0}  # (1 + 5) / 2
    assert log.window() == {}


def test_spent_budget_halts_every_later_step_until_read():
    log = StepLog(torch.device("cpu"), budget=0, reduce=lambda t: t)  # train.nonfinite: stop
    skips = [_add(log, 0, 1.0), _add(log, 1, float("nan")), _add(log, 2, 2.0), _add(log, 3, 2.0)]
    assert skips == [False, True, True, True]  # finite steps after the first non-finite one are not applied
    found = log.read()
    assert found.nonfinite == 1 and found.first[0:2] == ("g", 1) and found.first[2]["loss"] != found.first[2]["loss"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), "unet")


def test_logs_arrive_once_per_window_with_the_means_of_its_steps(teacher, tmp_path, monkeypatch):
    """log_every_nimg = 2 batches: the step-end hook gets logs at steps 2 and 4 (and the last, 5), each the mean
    of the per-step values a run logging every step sees; the steps inside a window read nothing from the
    device (no item / tolist / bool / float of a tensor: each would be a host sync on a GPU)."""
    def config(every):
        return tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=5, batch=B,
                               export={"enabled": False}, train={"log_every_nimg": every})

    _, every_step = run_tiny(config(B), tmp_path / "every")
    reads: dict[int, list[str]] = {}
    counting = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            if counting:
                reads.setdefault(counting[-1], []).append(name)
            return real(self, *args)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    real_step = Trainer.train_step

    def train_step(self, phase):
        counting.append(self.state.step)
        try:
            real_step(self, phase)
        finally:
            counting.pop()

    monkeypatch.setattr(Trainer, "train_step", train_step)
    _, windowed = run_tiny(config(2 * B), tmp_path / "windowed")
    logged = [r for r in windowed.logs if len(r) > 1]
    assert [r["step"] for r in logged] == [2, 4, 5]
    per_step = every_step.logs
    for r, steps in zip(logged, ([0, 1], [2, 3], [4])):
        for key in ("student/loss", "student/grad_norm", "student/sigma_hi"):
            assert r[key] == pytest.approx(sum(per_step[i][key] for i in steps) / len(steps), rel=1e-5)
    assert not any(k.endswith("/skipped") for r in logged for k in r)
    assert reads == {1: ["tolist"], 3: ["tolist"], 4: ["tolist"]}  # steps 1, 3, 4 close the windows
