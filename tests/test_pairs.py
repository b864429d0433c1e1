"""fewstep.pairs: teacher couplings on disk (reproducible, resumable, refused when mismatched) and their
delivery to the loss through Batch.pairs / Batch.pair_cond."""

import json

import pytest
import torch

from fewstep.cli import main
from fewstep.hookspecs import hookimpl
from fewstep.pairs import PairStore, generate_pairs
from fewstep.teacher import load_teacher
from fewstep.testing import make_tiny_teacher, tiny_run_config
from fewstep.types import Cond, LossOutput


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("t") / "class", "unet", conditioning="class")


def test_pairs_are_the_teachers_ode_solutions_and_reproducible(class_teacher, tmp_path):
    teacher = load_teacher(class_teacher)
    out = generate_pairs(teacher, tmp_path / "p", 10, num_steps=3, shard_size=4, batch_size=3)
    store = PairStore(out)
    assert len(store) == 10 and store.labels.shape == (10,) and store.x0.shape == (10, 1, 8, 8)
    assert len(list(out.glob("shard-*.safetensors"))) == 3
    expected = teacher.sample(store.noise, Cond(labels=store.labels), num_steps=3, decode=False)
    torch.testing.assert_close(store.x0, expected, rtol=1e-4, atol=1e-4)  # batched 3 at a time vs 10
    again = PairStore(generate_pairs(teacher, tmp_path / "q", 10, num_steps=3, shard_size=4))
    assert torch.equal(again.noise, store.noise) and torch.equal(again.labels, store.labels)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num"] == 10 and manifest["num_steps"] == 3 and manifest["conditioning"] == "class"


def test_generation_resumes_and_extends_but_never_mixes(class_teacher, tmp_path):
    teacher = load_teacher(class_teacher)
    out = generate_pairs(teacher, tmp_path / "p", 8, num_steps=2, shard_size=4)
    first = PairStore(out)
    (out / "shard-00001.safetensors").unlink()          # an interrupted run
    resumed = PairStore(generate_pairs(teacher, out, 8, num_steps=2, shard_size=4))
    assert torch.equal(resumed.x0, first.x0)
    extended = PairStore(generate_pairs(teacher, out, 11, num_steps=2, shard_size=4))
    assert len(extended) == 11 and torch.equal(extended.noise[:8], first.noise)
    with pytest.raises(ValueError, match="other settings.*num_steps"):
        generate_pairs(teacher, out, 8, num_steps=5, shard_size=4)


def test_store_is_checked_against_the_run_teacher(class_teacher, tmp_path):
    store = PairStore(generate_pairs(load_teacher(class_teacher), tmp_path / "p", 2, num_steps=1))
    other = load_teacher(make_tiny_teacher(tmp_path / "u", "unet"))
    with pytest.raises(ValueError, match="class-conditional pairs.*none-conditional"):
        store.check(other)
    with pytest.raises(FileNotFoundError, match="fewstep pairs"):
        PairStore(tmp_path / "missing")


def test_text_teacher_pairs_keep_their_prompts(tmp_path):
    teacher = load_teacher(make_tiny_teacher(tmp_path / "text", "unet_condition"))
    with pytest.raises(ValueError, match="prompt list"):
        generate_pairs(teacher, tmp_path / "none", 2, num_steps=1)
    store = PairStore(generate_pairs(teacher, tmp_path / "p", 5, num_steps=1, prompts=["a cat", "a dog"]))
    assert len(store.prompts) == 5 and set(store.prompts) <= {"a cat", "a dog"}
    noise, x0, labels, prompts = store.get(torch.tensor([4, 0]))
    assert noise.shape == (2, 1, 8, 8) and labels is None and prompts == (store.prompts[4], store.prompts[0])


class PairSpy:
    """Answers fewstep_loss before the method and records what the batches carried."""

    def __init__(self) -> None:
        self.batches = []

    @hookimpl(tryfirst=True)
    def fewstep_loss(self, batch, nets):
        self.batches.append(batch)
        out = nets.student(batch.pairs[0], torch.full((batch.size,), 500.0), batch.pair_cond)
        return LossOutput(loss=(out - batch.pairs[1]).square().flatten(1).mean(1))


def test_batches_carry_pairs_in_their_own_seeded_order(class_teacher, tmp_path):
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    assert main(["pairs", str(class_teacher), str(tmp_path / "p"), "--num", "12", "--steps", "1",
                 "--shard-size", "5"]) == 0
    store = PairStore(tmp_path / "p")
    config = tiny_run_config(class_teacher, {"name": "cd", "num_scales": 4}, steps=3, batch=4,
                             data={"pairs": str(tmp_path / "p")})
    spy = PairSpy()
    pm = build_manager("cd")
    pm.register(spy, name="spy")
    Trainer(config, pm, tmp_path / "run").fit()
    seen = torch.cat([b.pairs[0] for b in spy.batches])
    assert seen.shape == (12, 1, 8, 8)
    rows = [int(((store.noise - z).flatten(1).abs().sum(1) == 0).nonzero()) for z in seen]
    assert sorted(rows) == list(range(12))                  # one epoch of the store, shuffled
    for b in spy.batches:
        i = [int(((store.noise - z).flatten(1).abs().sum(1) == 0).nonzero()) for z in b.pairs[0]]
        assert torch.equal(b.pair_cond.labels.cpu(), store.labels[i])
        torch.testing.assert_close(b.pairs[1].cpu(), store.x0[i])
