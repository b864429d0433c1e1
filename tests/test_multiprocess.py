"""A 2-process CPU run (gloo DDP through accelerate) equals a 1-process run with the same global batch.

``accelerate.debug_launcher`` forks the workers and uses a fixed port (29500), so this test must not
run in parallel with another multiprocess test (NOTES.md, "Multi-process with accelerate on CPU").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep.testing import Recorder, make_tiny_teacher, run_tiny, tiny_run_config

METHOD = {"name": "cd", "num_scales": 8}
STEPS, BATCH = 3, 8


def _config(teacher: Path):
    # SGD, so that summation-order rounding differences are not amplified by Adam's normalisation.
    return tiny_run_config(teacher, METHOD, steps=STEPS, batch=BATCH, optimizer={"name": "sgd", "lr": 1e-4})


def _worker(teacher: str, run_dir: str, out_dir: str) -> None:
    """Runs in each forked rank: train the tiny CD run with a 2-process Accelerator, save the student."""
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    # The fork inherits the parent's accelerate singleton (a 1-process state when an earlier test built an
    # Accelerator); drop it so that this rank joins the 2-process group set up by the launcher.
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
    config = _config(Path(teacher))
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable)
    pm.register(Recorder(), name="recorder")
    trainer = Trainer(config, pm, Path(run_dir), accelerator=acc)
    trainer.fit()
    assert trainer.ctx.world_size == 2 and trainer.local_batch == BATCH // 2
    state = {k: v.detach().cpu().clone() for k, v in trainer.nets.student.state_dict().items()}
    torch.save(state, Path(out_dir) / f"rank{acc.process_index}.pt")


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    from accelerate import debug_launcher

    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    # 1-process reference first, in this process (the launcher's children are forks and leave it untouched).
    single, _ = run_tiny(_config(teacher), tmp_path / "single")
    assert single.ctx.world_size == 1
    reference = single.nets.student.state_dict()

    out = tmp_path / "ranks"
    out.mkdir()
    debug_launcher(_worker, args=(str(teacher), str(tmp_path / "multi"), str(out)), num_processes=2)

    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() == reference.keys()
    for k, v in rank0.items():
        assert torch.equal(v, rank1[k]), f"ranks differ in {k}"
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # The run did train: some weight moved away from the teacher's (SGD with lr 1e-4 moves them a little).
    initial = single.nets.teacher.net.state_dict()
    moved = any(not torch.equal(rank0[k], initial[k].float()) for k in rank0 if k in initial)
    assert moved
    # Checkpoints and the export were written once, by the main process, into the shared run folder.
    assert len(list((tmp_path / "multi" / "checkpoints").glob("step-*"))) == 1
    assert any((tmp_path / "multi" / "export").iterdir())
