"""Launcher settings against the recipe and the sharding plan (fewstep.distributed, docs/DISTRIBUTED.md).

A conflicting mixed precision, activation checkpointing or compile setting is refused, never overridden. The plan
(which networks accelerate prepares and shards, which stay replicated, how EMA and targets follow) is tested for
every registered method's real network set x {DDP, FSDP2, ZeRO-2, ZeRO-3} x {full, LoRA}. accelerate 1.16 only
switches to FSDP or DeepSpeed on accelerator devices, so the real 2-process runs below force accelerate's state to
FSDP2 on the CPU (gloo): accelerate's own FSDP2 preparation, gradient clipping and state-dict code then run over
torch's ``fully_shard``, which works on the CPU in torch 2.13.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fewstep.cli import main
from fewstep.distributed import (
    ENGINES,
    LaunchConflict,
    accelerator_engine,
    check_features,
    check_mixed_precision,
    deepspeed_settings,
    fingerprint,
    materialize,
    meta_skeleton,
    sharding_plan,
)
from fewstep.testing import Recorder, make_tiny_teacher, network_state, run_tiny, tiny_run_config


@pytest.mark.parametrize(("recipe", "env", "refused"), [
    ("no", {}, False),
    ("bf16", {"ACCELERATE_MIXED_PRECISION": "no"}, False),  # "no" is also accelerate's unset default
    ("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}, False),
    ("no", {"ACCELERATE_MIXED_PRECISION": "bf16"}, True),
    ("fp16", {"ACCELERATE_MIXED_PRECISION": "bf16"}, True),
])
def test_accelerate_config_precision(recipe, env, refused):
    if refused:
        with pytest.raises(LaunchConflict, match=rf"'{recipe}' in the recipe but the accelerate config"):
            check_mixed_precision(recipe, env)
    else:
        check_mixed_precision(recipe, env)


@pytest.mark.parametrize(("section", "refused"), [({"bf16": {"enabled": True}}, True),
                                                  ({"bf16": {"enabled": "auto"}}, False),
                                                  ({"fp16": {"enabled": False}}, False)])
def test_deepspeed_config_precision(tmp_path, section, refused):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, **section}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    if refused:
        with pytest.raises(LaunchConflict, match=r"DeepSpeed config .*bf16.enabled.*--set train.mixed_precision=bf16"):
            check_mixed_precision("no", env)
    else:
        check_mixed_precision("no", env)




def test_cli_refuses_a_conflicting_launch(teacher, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "cd.yaml"
    recipe.write_text(yaml.safe_dump(tiny_run_config(teacher, {"name": "cd"}).dump()))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert main(["distill", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.mixed_precision is 'no' in the recipe but the accelerate config" in err and "Traceback" not in err


def test_accelerator_engine():
    def fake(kind, fsdp=None, stage=None):
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp), deepspeed_plugin=SimpleNamespace(
            zero_stage=stage))
        return SimpleNamespace(distributed_type=SimpleNamespace(value=kind), state=state)

    assert accelerator_engine(fake("NO")) == "ddp"
    assert accelerator_engine(fake("MULTI_GPU")) == "ddp"
    assert accelerator_engine(fake("MULTI_CPU")) == "ddp"
    assert accelerator_engine(fake("FSDP", fsdp=2)) == "fsdp2"
    assert accelerator_engine(fake("FSDP", fsdp=1)) == "fsdp1"
    assert accelerator_engine(fake("DEEPSPEED", stage=3)) == "zero3"
    assert accelerator_engine(fake("DEEPSPEED", stage=None)) == "zero2"  # accelerate's DeepSpeedPlugin default


@pytest.mark.parametrize(("checkpointing", "compile_", "env", "refused"), [
    (True, False, {"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "checkpointed twice"),
    (False, False, {"FSDP_ACTIVATION_CHECKPOINTING": "true"}, None),  # accelerate's alone: used as asked
    (True, False, {}, None),
    (False, True, {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "compiled twice"),
    (False, True, {"ACCELERATE_DYNAMO_BACKEND": "NO"}, None),
    (False, False, {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, None),
])
def test_recipe_and_accelerate_config_may_not_both_ask(checkpointing, compile_, env, refused):
    if refused is None:
        check_features(checkpointing, compile_, env)
    else:
        with pytest.raises(LaunchConflict, match=refused):
            check_features(checkpointing, compile_, env)


# Every registered method with the settings that give it its full network set on a tiny class-conditional teacher.
METHODS = {"add": {}, "caf": {}, "cd": {}, "cd+target": {"name": "cd", "target_ema": 0.9}, "ct": {}, "ctm": {},
           "diffusion": {}, "dmd": {}, "dmd2": {}, "ect": {}, "fdistill": {}, "flowmap": {}, "guided": {}, "ict": {},
           "kd": {}, "ladd": {}, "lowdiff": {"resolutions": [4, 8]}, "meanflow": {}, "msd": {}, "pcm": {},
           "reflow": {}, "scm": {}, "sct": {}, "tcm": {}}
TESTED = ("ddp", "fsdp2", "zero2", "zero3")


def test_every_registered_method_is_listed():
    from fewstep.plugin import discover, method_registry

    assert {cfg.get("name", name) for name, cfg in METHODS.items()} == set(method_registry(discover()))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Class-conditional, so that every method builds (guided and msd need conditions)."""
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), "unet", conditioning="class")


@pytest.fixture(scope="module")
def method_networks(teacher, tmp_path_factory):
    """Per method: (optimizer groups, fingerprints of its networks, whether it takes JVPs through the student),
    from the method's own hooks (as Trainer.setup builds them, without data). A LoRA student has the same network
    names and groups (its extra networks are adapters on one shared base), so the LoRA cases reuse them."""
    from fewstep import lora
    from fewstep.plugin import build_manager
    from fewstep.types import Nets, RunContext

    found = {}
    for key, overrides in METHODS.items():
        cfg = tiny_run_config(teacher, {"name": key, **overrides})
        hook = build_manager(cfg.method.name).hook
        ctx = RunContext(method=cfg.method, config=cfg, device=torch.device("cpu"), dtype=torch.float32,
                         run_dir=tmp_path_factory.mktemp(key), seed=0, rank=0, world_size=1, global_batch=4,
                         is_main=True)
        torch.manual_seed(0)
        built = hook.fewstep_build_teacher(ctx=ctx)
        student = hook.fewstep_build_student(ctx=ctx, teacher=built)
        extra = {}
        for more in hook.fewstep_extra_networks(ctx=ctx, teacher=built, student=student):
            extra.update(more or {})
        nets = Nets(built, student, lora.share_networks(cfg, student, extra))
        groups = {g.name: g.modules for g in hook.fewstep_optimizer_groups(ctx=ctx, nets=nets)}
        found[key] = (groups, {n: fingerprint(nets.get(n)) for n in nets.names()}, hasattr(cfg.method, "jvp"))
    return found


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", list(METHODS))
def test_plan_for_every_method_and_engine(method_networks, method, lora):
    groups, networks, takes_jvp = method_networks[method]
    trainable = {n for mods in groups.values() for n in mods}
    same_arch = {n for n in networks if n not in trainable and networks[n] in {networks[t] for t in trainable}}
    assert "ema" in same_arch  # the evaluation EMA follows the student under every method
    one_engine = len(trainable) == 1 and len(groups) == 1
    for engine in TESTED:
        refusal = (("one DeepSpeed engine" if engine.startswith("zero") and not one_engine else None)
                   or ("LoRA student" if lora and engine in ("fsdp2", "zero3") else None))
        if refusal:
            with pytest.raises(LaunchConflict, match=refusal):
                sharding_plan(engine, groups, networks, lora=lora)
            continue
        plan = sharding_plan(engine, groups, networks, lora=lora)
        assert set(plan.prepared) == trainable and plan.followers.keys() == same_arch
        assert plan.placement["teacher"] == "replicated" and plan.placement.keys() == {"teacher", *networks}
        sharded = {n for n, p in plan.placement.items() if p == "sharded"}
        expected = {"ddp": set(), "zero2": set(), "zero3": trainable, "fsdp2": trainable | same_arch}[engine]
        assert sharded == expected, (engine, plan.describe())
        assert plan.gather_followers == (engine == "zero3") and plan.sharded == bool(expected)
        if takes_jvp and engine == "fsdp2":  # forward-mode AD through a sharded student: refused (unverified)
            with pytest.raises(LaunchConflict, match="jvp: finite_difference"):
                sharding_plan(engine, groups, networks, lora=lora, jvp="exact")
            assert sharding_plan(engine, groups, networks, lora=lora, jvp="finite_difference") == plan


def test_plan_of_consistency_distillation_with_a_target(method_networks):
    groups, networks, _ = method_networks["cd+target"]
    plan = sharding_plan("fsdp2", groups, networks)
    assert plan.placement == {"teacher": "replicated", "student": "sharded", "target": "sharded", "ema": "sharded"}
    assert plan.followers == {"target": "student", "ema": "student"}
    assert plan.describe() == ("fsdp2: teacher: replicated (frozen); student: sharded (trainable); target: sharded "
                               "(follows student); ema: sharded (follows student)")
    zero3 = sharding_plan("zero3", groups, networks)
    assert zero3.placement == {"teacher": "replicated", "student": "sharded", "target": "replicated",
                               "ema": "replicated"} and zero3.gather_followers


def test_plan_of_a_multi_network_method(method_networks):
    """DMD2: the generator and the critic's fake score and GAN head are all trainable; the EMA follows the
    student; nothing else is frozen besides the teacher."""
    groups, networks, _ = method_networks["dmd2"]
    plan = sharding_plan("fsdp2", groups, networks)
    assert plan.prepared == ("student", "fake_score", "gan_head") and plan.followers == {"ema": "student"}
    assert all(p == "sharded" for n, p in plan.placement.items() if n != "teacher")
    with pytest.raises(LaunchConflict, match=r"2 optimizer group\(s\) over 3 trainable network\(s\).*FSDP2"):
        sharding_plan("zero2", groups, networks)


@pytest.mark.parametrize(("kwargs", "refused"), [
    ({"engine": "fsdp1"}, "fsdp_version: 2"),
    ({"engine": "zero2", "accumulation": 2}, "train.accumulation: 1"),
    ({"engine": "zero3", "nonfinite_skip": True}, "train.nonfinite: stop"),
])
def test_plan_refusals(kwargs, refused):
    with pytest.raises(LaunchConflict, match=refused):
        sharding_plan(groups={"student": ("student",)}, networks={"student": 1, "ema": 1}, **kwargs)
    assert set(ENGINES) >= set(TESTED)


def test_plan_rejects_unknown_inputs():
    with pytest.raises(ValueError, match="unknown engine"):
        sharding_plan("tp", {"student": ("student",)}, {"student": 1})
    with pytest.raises(ValueError, match=r"do not exist: \['critic'\]"):
        sharding_plan("ddp", {"student": ("critic",)}, {"student": 1})


def test_deepspeed_settings_follow_the_recipe():
    """accelerate fills an "auto" gradient_clipping with 1.0: fewstep fills the recipe's max_grad_norm (0: off)
    instead (a 2-process ZeRO-2 run clipped at 1 silently drifted from the 1-process run), and refuses a config
    that fixes another value."""
    generated = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                 "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    assert deepspeed_settings(generated, 4, None) == {
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": True}
    assert deepspeed_settings({"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 10,
                               "zero_optimization": {"stage": 2}}, 4, 10.0) == {}
    with pytest.raises(LaunchConflict, match=r"max_grad_norm is None in the recipe but .* clips gradients at 1.0"):
        deepspeed_settings({"gradient_clipping": 1.0}, 4, None)


class _EngineStandIn:
    """The calls accelerate's DeepSpeedEngineWrapper makes on a DeepSpeed engine, for one torch optimizer: backward,
    then at the accumulation boundary the step (recording the learning rate it uses) and zeroing the gradients."""

    def __init__(self, optimizer, lrs: list[float]) -> None:
        self.optimizer, self.lrs = optimizer, lrs

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        assert is_boundary  # fewstep refuses train.accumulation > 1 under DeepSpeed

    def backward(self, loss, **kwargs) -> None:
        loss.backward(**kwargs)

    def step(self) -> None:
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.optimizer.zero_grad()


def _stepping_accelerator(in_backward: bool, lrs: list[float]):
    """A CPU Accelerator whose optimizer steps where DeepSpeed's do (``in_backward``: inside ``Accelerator.backward``,
    through accelerate's own DeepSpeedEngineWrapper and DeepSpeedOptimizerWrapper, whose step is a no-op), or where
    the others do (the trainer's step call); either way the learning rate of each real step goes to ``lrs``.
    DeepSpeed itself does not run on this CPU machine (not installed; accelerate uses it on accelerators only)."""
    from accelerate import Accelerator
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper

    class SteppingAccelerator(Accelerator):
        def prepare_optimizer(self, optimizer, device_placement=None):
            if in_backward:
                self.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(_EngineStandIn(optimizer, lrs))
                return DeepSpeedOptimizerWrapper(optimizer)
            step = optimizer.step

            def recorded(*args, **kwargs):
                lrs.append(optimizer.param_groups[0]["lr"])
                return step(*args, **kwargs)

            optimizer.step = recorded
            return super().prepare_optimizer(optimizer, device_placement=device_placement)

        def backward(self, loss, **kwargs):
            if not in_backward:
                return super().backward(loss, **kwargs)
            # Accelerator.backward's DeepSpeed branch, without the distributed type that would also prepare DeepSpeed
            self.deepspeed_engine_wrapped.backward(loss, sync_gradients=self.sync_gradients, **kwargs)

    return SteppingAccelerator(cpu=True)


def test_learning_rate_of_each_step_when_the_optimizer_steps_inside_backward(teacher, tmp_path):
    """DeepSpeed steps inside Accelerator.backward, so the trainer sets each step's learning rate before the backward
    pass: under a warm-up every step uses its own rate (1/8, 2/8, 3/8 of optimizer.lr), as when the trainer steps,
    and the weights are the same. Before, the step inside backward used the rate set for the previous step (step 0
    the un-warmed optimizer.lr)."""
    from accelerate.state import AcceleratorState

    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 8}, steps=3, batch=4,
                             optimizer={"warmup_nimg": 32}, validation={"steps": [1], "teacher_steps": None},
                             export={"enabled": False})
    lrs: dict[bool, list[float]] = {True: [], False: []}
    students = {}
    for in_backward in (False, True):
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
        try:
            acc = _stepping_accelerator(in_backward, lrs[in_backward])
            trainer = Trainer(config, build_manager("cd"), tmp_path / f"run-{in_backward}", accelerator=acc)
            trainer.fit()
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        students[in_backward] = trainer.nets.student.state_dict()
    assert [round(lr / 1e-4, 6) for lr in lrs[False]] == [0.125, 0.25, 0.375]
    assert lrs[True] == lrs[False]
    for k, v in students[False].items():
        torch.testing.assert_close(students[True][k], v)


def test_skeleton_holds_no_weights_until_materialized():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    skeleton = meta_skeleton(net)
    assert all(p.is_meta for p in skeleton.parameters()) and not any(b.is_meta for b in skeleton.buffers())
    whole = materialize(skeleton, net.state_dict(), torch.device("cpu"))
    x = torch.randn(5, 3)
    torch.testing.assert_close(whole.eval()(x), net.eval()(x), rtol=0, atol=0)
    assert all(p.requires_grad for p in whole.parameters())


def test_plan_matches_what_the_trainer_prepares(teacher, tmp_path):
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    config = tiny_run_config(teacher, {"name": "cd", "target_ema": 0.9})
    trainer = Trainer(config, build_manager("cd"), tmp_path / "run")
    trainer.setup()
    assert trainer.plan.engine == "ddp"
    assert trainer.plan.placement == {"teacher": "replicated", "student": "replicated", "target": "replicated",
                                      "ema": "replicated"}
    assert set(trainer.wrapped) == set(trainer.plan.prepared) == {"student"}  # what accelerate wraps


def _force_fsdp2(acc) -> None:
    """Switch a 2-process MULTI_CPU accelerate state to FSDP2 (accelerate itself only does so on accelerator
    devices). Both shared states carry the type: accelerate re-reads PartialState's when it builds an optimizer."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)


def _fsdp2_ranks(config, run_dir: Path, out: Path, networks: tuple[str, ...], checkpoint: Path | None = None
                 ) -> list[dict]:
    """Train ``config`` with 2 CPU processes under FSDP2 (resuming from ``checkpoint`` when given); each rank's final
    networks (gathered) and logs."""
    from accelerate import debug_launcher

    def worker() -> None:
        torch.set_num_threads(1)
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from fewstep.plugin import build_manager
        from fewstep.trainer import Trainer

        AcceleratorState._reset_state(reset_partial_state=True)  # the fork inherits the parent's singleton
        acc = Accelerator(cpu=True)
        _force_fsdp2(acc)
        pm = build_manager(config.method.name)
        recorder = Recorder()
        pm.register(recorder, name="recorder")
        trainer = Trainer(config, pm, run_dir, accelerator=acc, resume=checkpoint is not None, checkpoint=checkpoint)
        trainer.fit()
        assert trainer.plan.engine == "fsdp2" and acc.is_fsdp2
        torch.save({"nets": network_state(trainer.nets, networks), "logs": recorder.logs},
                   out / f"rank{acc.process_index}.pt")

    out.mkdir(parents=True, exist_ok=True)
    debug_launcher(worker, num_processes=2)
    return [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_run_on_two_cpu_processes_matches_one_process(teacher, tmp_path):
    """CD with a target network and the evaluation EMA under FSDP2 (student, target and EMA sharded; the target
    and EMA updated shard by shard): after 2 steps the gathered networks equal a 1-process run's, the losses are
    the same, and the checkpoint holds whole networks that the export-side loader reads."""
    from safetensors.torch import load_file

    names = ("student", "target", "ema")
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 8, "target_ema": 0.9}, steps=2, batch=8,
                             optimizer={"name": "sgd", "lr": 1e-4})
    ranks = _fsdp2_ranks(config, tmp_path / "fsdp2", tmp_path / "ranks", names)
    single, recorder = run_tiny(config, tmp_path / "single")
    reference = network_state(single.nets, names)
    for rank in ranks:
        assert rank["nets"].keys() == reference.keys()
        for k, v in reference.items():
            torch.testing.assert_close(rank["nets"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        for got, want in zip(rank["logs"], recorder.logs):
            assert got["student/loss"] == pytest.approx(want["student/loss"], rel=1e-5)
    assert any(not torch.equal(reference[f"target.{k}"], v) for k, v in load_file(
        tmp_path / "single" / "checkpoints" / "step-00000002" / "nets" / "student.safetensors").items())
    (checkpoint,) = (tmp_path / "fsdp2" / "checkpoints").glob("step-*")
    for name in names:
        saved = load_file(checkpoint / "nets" / f"{name}.safetensors")
        assert saved.keys() == {k.split(".", 1)[1] for k in reference if k.startswith(f"{name}.")}
        for k, v in saved.items():
            torch.testing.assert_close(v, ranks[0]["nets"][f"{name}.{k}"], rtol=0, atol=0)
    assert any((checkpoint / "optimizers").iterdir())
    assert any((tmp_path / "fsdp2" / "export").iterdir())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_resume_replays_the_run(teacher, tmp_path):
    """An FSDP2 checkpoint (whole networks, accelerate's FSDP optimizer state) resumed by 2 processes under FSDP2:
    the second step replayed from the first step's checkpoint gives the uninterrupted run's networks."""
    names = ("student", "target", "ema")
    config = tiny_run_config(teacher, {"name": "cd", "num_scales": 8, "target_ema": 0.9}, steps=2, batch=8,
                             optimizer={"name": "adam", "lr": 1e-3}, train={"checkpoint_every_nimg": 8})
    whole = _fsdp2_ranks(config, tmp_path / "run", tmp_path / "ranks", names)
    first = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert (first / "trainer_state.json").is_file()
    resumed = _fsdp2_ranks(config, tmp_path / "resumed", tmp_path / "ranks_resumed", names, checkpoint=first)
    for k, v in whole[0]["nets"].items():
        torch.testing.assert_close(resumed[0]["nets"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert [r["step"] for r in resumed[0]["logs"]] == [2]
