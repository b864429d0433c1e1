"""A 2-process CPU run (gloo DDP through accelerate) equals a 1-process run with the same global batch.

``accelerate.debug_launcher`` forks the workers and uses a fixed port (29500), so this test must not
run in parallel with another multiprocess test (NOTES.md, "Multi-process with accelerate on CPU").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep.testing import (
    assert_ranks_match,
    make_tiny_teacher,
    network_state,
    run_on_ranks,
    run_tiny,
    tiny_run_config,
)

METHOD = {"name": "cd", "num_scales": 8}
STEPS, BATCH = 3, 8


def _config(teacher: Path):
    # SGD, so that summation-order rounding differences are not amplified by Adam's normalisation.
    return tiny_run_config(teacher, METHOD, steps=STEPS, batch=BATCH, optimizer={"name": "sgd", "lr": 1e-4})


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    # 1-process reference first, in this process (the launcher's children are forks and leave it untouched).
    single, _ = run_tiny(_config(teacher), tmp_path / "single")
    assert single.ctx.world_size == 1
    reference = network_state(single.nets, ("student",))

    ranks = run_on_ranks(_config(teacher), tmp_path / "multi", tmp_path / "ranks")
    assert_ranks_match(ranks, reference)
    # The run did train: some weight moved away from the teacher's (SGD with lr 1e-4 moves them a little).
    initial = single.nets.teacher.net.state_dict()
    assert any(not torch.equal(ranks[0][f"student.{k}"], v.float()) for k, v in initial.items())
    # Checkpoints and the export were written once, by the main process, into the shared run folder.
    assert len(list((tmp_path / "multi" / "checkpoints").glob("step-*"))) == 1
    assert any((tmp_path / "multi" / "export").iterdir())
