"""fewstep.export: students exported as diffusers folders, loaded back with diffusers and sampled; the stock
ConsistencyModelPipeline where it reproduces fewstep's sampler; `fewstep export` and `fewstep sample`."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from fewstep import cli
from fewstep.config import write_resolved
from fewstep.export import FewStepPipeline, condition, load_export
from fewstep.sampling import generate
from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

CASES = {
    "unconditional": ("unet", {}, {"batch_size": 3}),
    "class": ("dit", {}, {"class_labels": [1, 4, 9]}),
    "text_latent": ("unet_condition", {"latent": True}, {"prompt": ["a cat", "two dogs", "tree"]}),
}


def _fewstep_images(trainer, kwargs, steps, seed=0):
    """What fewstep's own sampler draws for the pipeline's noise and generator (same seed)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((3, *trainer.nets.teacher.sample_shape), generator=g)
    cond = condition(trainer.nets.teacher, 3, kwargs.get("class_labels"), kwargs.get("prompt"))
    return (generate(trainer.pm.hook, trainer.ctx, trainer.nets, noise, cond, steps, generator=g).clamp(-1, 1) + 1) / 2


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    backbone, options, kwargs = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    teacher = make_tiny_teacher(root / "teacher", backbone, **options)
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=2, export={"steps": 2})
    trainer, _ = run_tiny(config, root / "run")
    write_resolved(config, root / "run")
    return trainer, root / "run", kwargs, request.param


def test_export_loads_with_diffusers_and_samples_like_fewstep(trained):
    trainer, run, kwargs, case = trained
    out = run / "export"
    meta = json.loads((out / "fewstep_export.json").read_text())
    assert meta["method"] == "cd" and meta["pipeline"] == "FewStepPipeline" and meta["steps"] == 2
    assert "## Sampling" in (out / "README.md").read_text()
    # Custom pipeline code in the folder: diffusers asks for trust_remote_code (it is two lines importing fewstep).
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "FewStepPipeline"
    if case == "text_latent":
        assert pipe.vae is not None and pipe.text_encoder is not None and pipe.tokenizer is not None
    for steps in (1, 2):
        images = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
                      **kwargs).images
        assert images.shape == (3, *trainer.nets.teacher.data_shape)
        torch.testing.assert_close(images, _fewstep_images(trainer, kwargs, steps), rtol=0, atol=1e-6)
    pil = FewStepPipeline.from_pretrained(out)(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert len(pil) == 3 and pil[0].size == trainer.nets.teacher.data_shape[1:][::-1]


def test_export_rejects_missing_or_wrong_conditions(trained):
    _, run, kwargs, case = trained
    pipe = FewStepPipeline.from_pretrained(run / "export")
    if case == "unconditional":
        with pytest.raises(ValueError, match="unconditional"):
            pipe(class_labels=[0])
    elif case == "class":
        with pytest.raises(ValueError, match="class_labels"):
            pipe(batch_size=2)
        with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
            pipe(class_labels=[3, 12])
    else:
        with pytest.raises(ValueError, match="prompt"):
            pipe(batch_size=2)


def test_export_command_and_sample_from_an_export(trained, tmp_path):
    trainer, run, kwargs, case = trained
    out = tmp_path / "exported"
    assert cli.main(["export", str(run), str(out)]) == 0
    loaded = load_export(out)
    for k, v in trainer.nets.ema.state_dict().items():  # the EMA is what is exported
        assert torch.equal(v, loaded.nets.student.state_dict()[k]), k
    args = ["sample", str(out), "--steps", "1", "2", "--num", "4", "--out", str(tmp_path / "grid.png")]
    if case == "text_latent":
        args += ["--prompt", "a cat"]
    assert cli.main(args) == 0 and (tmp_path / "grid.png").is_file()
    assert cli.main(["sample", str(out), "--teacher-steps", "2"]) == 2   # an export holds no teacher


def test_export_of_an_early_checkpoint(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=3,
                             train={"checkpoint_every_nimg": 4, "keep_checkpoints": 5})
    trainer, _ = run_tiny(config, tmp_path / "run")
    write_resolved(config, tmp_path / "run")
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "early"), "--checkpoint", "4"]) == 0
    early = load_export(tmp_path / "early").nets.student.state_dict()
    final = trainer.nets.ema.state_dict()
    assert any(not torch.equal(early[k], final[k]) for k in final)
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "x"), "--checkpoint", "7"]) == 2


def test_sampling_networks_travel_with_the_export(tmp_path):
    """Networks named by fewstep_sampling_networks are written and restored (here CT's target network)."""
    from fewstep.export import export_run
    from fewstep.hookspecs import hookimpl

    class NeedsTarget:
        @hookimpl
        def fewstep_sampling_networks(self):
            return ["target"]

    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    config = tiny_run_config(teacher, {"name": "ct", "s0": 2, "s1": 4}, steps=2)
    trainer, _ = run_tiny(config, tmp_path / "run")
    trainer.pm.register(NeedsTarget(), name="needs-target")
    export_run(trainer.pm.hook, trainer.ctx, trainer.nets, tmp_path / "out")
    loaded = load_export(tmp_path / "out")
    for k, v in trainer.nets.extra["target"].state_dict().items():
        assert torch.equal(v, loaded.nets.extra["target"].state_dict()[k]), k


@pytest.mark.parametrize("conditioning", [None, "class"])
def test_stock_consistency_pipeline_gives_the_same_images(tmp_path, conditioning):
    """A CD student of an EDM teacher in the OpenAI timestep convention exports as diffusers'
    ConsistencyModelPipeline + CMStochasticIterativeScheduler, which draws fewstep's samples."""
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet", process="edm", conditioning=conditioning,
                                process_options={"timestep_scale": 1000.0})
    trainer, _ = run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=3), tmp_path / "run")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "export")  # stock: no custom code
    assert type(pipe).__name__ == "ConsistencyModelPipeline"
    assert type(pipe.scheduler).__name__ == "CMStochasticIterativeScheduler"
    kwargs = {"class_labels": [1, 7, 3]} if conditioning else {}
    for steps in (1, 2, 3, 4):
        stock = pipe(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                     output_type="pt", **{k: torch.tensor(v) for k, v in kwargs.items()}).images
        torch.testing.assert_close(stock, _fewstep_images(trainer, kwargs, steps), rtol=0, atol=1e-5)
    # fewstep reads the stock folder too
    assert load_export(tmp_path / "run" / "export").meta["pipeline"] == "ConsistencyModelPipeline"


def test_stock_pipeline_only_where_it_is_exact(tmp_path):
    """A VP teacher: the stock consistency scheduler would not reproduce the sampler, so FewStepPipeline."""
    teacher = make_tiny_teacher(tmp_path / "teacher", "unet")
    run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=1), tmp_path / "run")
    index = json.loads((tmp_path / "run" / "export" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_fewstep", "FewStepPipeline"]
