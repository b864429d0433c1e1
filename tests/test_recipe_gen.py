"""`fewstep recipe TEACHER --method NAME`: the generated recipe validates for every method that distils a
teacher, its values follow the teacher's configs, and bad inputs are refused with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fewstep.cli import main
from fewstep.plugin import discover, method_registry
from fewstep.recipe_gen import CONSISTENCY_SIGMA_MAX, GENERATOR_SIGMA_MAX, make_recipe, summarize_teacher
from fewstep.testing import make_tiny_teacher, tiny_family_teacher, write_digit_prompts

#: Methods that build their own network (teacher pretraining) instead of distilling a folder.
OWN_NETWORK = {"diffusion"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str | None]]:
    root = tmp_path_factory.mktemp("recipe-teachers")
    prompts = write_digit_prompts(root / "prompts.txt")
    return {
        "vp_eps": (make_tiny_teacher(root / "vp"), None),  # UNet2DModel, DDPM linear betas, epsilon
        "edm": (make_tiny_teacher(root / "edm", process="edm"), None),
        "dit": (make_tiny_teacher(root / "dit", "dit"), None),
        "text": (make_tiny_teacher(root / "text", "unet_condition"), str(prompts)),
        **{family: (tiny_family_teacher(family, root / "families")[0], str(prompts))
           for family in ("sd", "sdxl", "sd3", "flux", "pixart_sigma", "sana")},
    }


def _generate_and_validate(folder: Path, method: str, prompts: str | None, out: Path) -> str:
    args = ["recipe", str(folder), "--method", method, "--out", str(out)] + (["--prompts", prompts] if prompts else [])
    assert main(args) == 0, f"fewstep recipe failed for {method} on {folder}"
    text = out.read_text()
    needs_pairs = "pairs" in (yaml.safe_load(text)["data"])
    # a method on teacher pairs validates once the pairs exist (the header names the command): check the
    # recipe itself, then that the full check asks for the pairs
    assert main(["validate", str(out)] + (["--skip-inputs"] if needs_pairs else [])) == 0, text
    if needs_pairs:
        assert "fewstep pairs" in text.split("\nmethod:")[0]
        assert main(["validate", str(out)]) == 2
    return text


#: Methods that need a conditional teacher (guided: CFG's unconditional branch; msd: conditions to partition):
#: ``fewstep recipe`` refuses them for an unconditional one, as ``validate`` and ``distill`` do.
NEEDS_CONDITIONS = {"guided": "unconditional, so classifier-free guidance", "msd": "msd partitions the conditions"}


def test_every_method_on_every_tiny_teacher_validates(teachers, tmp_path: Path, capsys) -> None:
    from fewstep.data_config import teacher_info

    methods = sorted(set(method_registry(discover())) - OWN_NETWORK)
    assert {"cd", "dmd2", "scm", "ctm", "kd"} <= set(methods)
    refused = 0
    for name, (folder, prompts) in teachers.items():
        unconditional = teacher_info(folder).conditioning == "none"
        for method in methods:
            out = tmp_path / f"{name}-{method}.yaml"
            if unconditional and method in NEEDS_CONDITIONS:
                capsys.readouterr()
                assert main(["recipe", str(folder), "--method", method, "--out", str(out)]) == 2
                assert NEEDS_CONDITIONS[method] in capsys.readouterr().err and not out.exists()
                refused += 1
                continue
            text = _generate_and_validate(folder, method, prompts, out)
            assert "STARTING POINT, NOT A MEASURED RECIPE" in text and "# Launch:" in text
    assert refused == 4  # guided and msd on the two unconditional teachers (vp_eps, edm)


def test_summary_reads_the_schedule_from_the_configs(teachers) -> None:
    vp = summarize_teacher(teachers["vp_eps"][0])
    assert (vp.family, vp.process, vp.prediction_type, vp.beta_schedule) == ("pixel_unet", "vp", "epsilon", "linear")
    # closed form: DDPM's linear betas 1e-4..0.02 over 1000 steps, alpha_bar_T = prod(1 - beta)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    alpha_bar = 1.0
    for b in betas:
        alpha_bar *= 1 - b
    assert vp.alpha_bar_T == pytest.approx(alpha_bar, rel=1e-9)
    assert vp.x0_factor == pytest.approx(alpha_bar ** -0.5, rel=1e-9) and vp.ill_conditioned
    edm = summarize_teacher(teachers["edm"][0])
    assert (edm.process, edm.sigma_min, edm.sigma_max, edm.sigma_data) == ("edm", 0.002, 80.0, 0.5)
    dit = summarize_teacher(teachers["dit"][0])
    assert (dit.conditioning, dit.num_classes) == ("class", 10)
    sd = summarize_teacher(teachers["sd"][0])
    assert sd.conditioning == "text" and sd.latent and sd.encoders == ("CLIPTextModel",)
    assert sd.data_shape == (3, 32, 32) and sd.beta_schedule == "scaled_linear" and not sd.ill_conditioned


def test_choices_follow_the_teacher(teachers, tmp_path: Path) -> None:
    def method_of(key: str, method: str) -> dict:
        folder, prompts = teachers[key]
        return yaml.safe_load(make_recipe(folder, method, out=tmp_path / "r.yaml", prompts=prompts))

    # an ill-conditioned eps VP teacher: the consistency grid's top inside the teacher's range, the
    # generator's input level below the ill-conditioned end
    assert method_of("vp_eps", "cd")["method"]["sigma_max"] == CONSISTENCY_SIGMA_MAX
    assert method_of("vp_eps", "dmd2")["method"]["sigma_max"] == GENERATOR_SIGMA_MAX
    # ... and says where auto caps its students (the level and timestep fewstep.backbones.InputCap uses)
    from fewstep.backbones import AUTO_CAP_SIGMA, InputCap
    from fewstep.diffusion import VPProcess

    vp = summarize_teacher(teachers["vp_eps"][0])
    assert vp.student_cap == AUTO_CAP_SIGMA and vp.student_cap_timestep == 395 == InputCap(VPProcess(), AUTO_CAP_SIGMA).timestep
    cd_text = make_recipe(teachers["vp_eps"][0], "cd", out=tmp_path / "r.yaml")
    assert yaml.safe_load(cd_text)["teacher"]["student_sigma_cap"] == "auto"
    flat = " ".join(line.strip().lstrip("#").strip() for line in cd_text.splitlines())  # comments unwrapped
    assert f"at sigma 2 (timestep {vp.student_cap_timestep})" in flat and "gain 157" in flat
    # well-conditioned teachers get no cap and no note
    for key in ("edm", "sd", "sd3", "flux"):
        assert summarize_teacher(teachers[key][0]).student_cap is None
    assert "student_sigma_cap" not in make_recipe(teachers["sd"][0], "cd", out=tmp_path / "r.yaml",
                                                  prompts=teachers["sd"][1])
    # EDM: the teacher's own range (the method's default: none)
    assert method_of("edm", "cd")["method"]["sigma_max"] is None
    # a VP text teacher: LCM-style CD on the teacher grid, guided, with the teacher's guidance scale
    sd = method_of("sd", "cd")
    assert {k: sd["method"][k] for k in ("grid", "skip", "solver", "boundary", "guidance")} == {
        "grid": "teacher", "skip": 20, "solver": "ddim", "boundary": "lcm", "guidance": [2.0, 8.0]}
    assert sd["teacher"]["guidance"] > 1 and (sd["data"]["resolution"], sd["data"]["channels"]) == (32, 3)
    assert sd["data"]["source"] == "digits"  # the placeholder images, captioned by --prompts
    assert (tmp_path / sd["data"]["prompts"]).resolve() == Path(teachers["sd"][1]).resolve()  # relative to the recipe
    # a method default above the teacher's range is capped (sCM's 80 on SD's top level 14.6)
    assert method_of("sd", "scm")["method"]["sigma_max"] == pytest.approx(summarize_teacher(teachers["sd"][0]).sigma_max,
                                                                         rel=1e-3)
    # flow teachers keep their own time range, with the reason written beside it; Flux-dev's guidance input
    sd3 = make_recipe(teachers["sd3"][0], "cd", out=tmp_path / "r.yaml", prompts=teachers["sd3"][1])
    assert yaml.safe_load(sd3)["method"]["sigma_max"] is None and "kept for this teacher: a flow teacher" in sd3
    assert yaml.safe_load(sd3)["method"]["grid"] == "karras"  # LCM's teacher grid is VP only
    assert method_of("flux", "dmd2")["teacher"]["guidance"] == 3.5
    # DMD gets DMD2's two time-scale rule; fields named `ratio` that mean something else keep their defaults
    dmd = make_recipe(teachers["dit"][0], "dmd", out=tmp_path / "r.yaml")
    assert yaml.safe_load(dmd)["method"]["ratio"] == 5 and "two time-scale rule" in dmd
    assert method_of("dit", "dmd2")["method"]["ratio"] == 5
    assert method_of("dit", "ladd")["method"]["ratio"] == 1 and method_of("dit", "meanflow")["method"]["ratio"] == 0.75
    # a field keeps its default where the rule does not apply
    assert method_of("dit", "cd")["method"]["grid"] == "karras"


def test_clip_sample_teacher_clamps(tmp_path: Path) -> None:
    folder = make_tiny_teacher(tmp_path / "clip")
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": True}))
    assert summarize_teacher(folder).clip_sample
    text = make_recipe(folder, "cd", out=tmp_path / "r.yaml")
    assert "clip_sample true" in text and "teacher's scheduler bounds x0 (clip_sample)" in text


def test_refusals(teachers, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = str(teachers["vp_eps"][0])
    cases = [
        (["recipe", str(tmp_path / "missing"), "--method", "cd"], "teacher folder not found"),
        (["recipe", str(tmp_path), "--method", "cd"], "is not a diffusers folder"),
        (["recipe", folder, "--method", "cdd"], "unknown method 'cdd'"),
        (["recipe", folder, "--method", "diffusion"], "builds its own network"),
        (["recipe", str(teachers["text"][0]), "--method", "cd"], "pass --prompts"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_weak_checkpoint_autoguides_the_real_score(teachers, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--weak: a matching weaker checkpoint becomes teacher.autoguidance with method.real_guidance 1.5 (and DMD's
    regression pairs are made at that guidance); the recipe validates; a method without a real score and a
    checkpoint of another kind are refused before anything is written."""
    from fewstep.config import load_config

    folder = teachers["vp_eps"][0]
    weak = make_tiny_teacher(tmp_path / "weak")
    out = tmp_path / "r" / "dmd2.yaml"
    assert main(["recipe", str(folder), "--method", "dmd2", "--out", str(out), "--weak", str(weak)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["method"]["real_guidance"] == 1.5
    assert (out.parent / doc["teacher"]["autoguidance"]).resolve() == weak.resolve()
    assert "autoguided by --weak" in out.read_text()
    config = load_config(out)
    assert config.method.real_guidance == 1.5 and Path(config.teacher.autoguidance).resolve() == weak.resolve()
    assert main(["validate", str(out)]) == 0
    dmd = make_recipe(folder, "dmd", out=tmp_path / "r" / "dmd.yaml", weak=weak)
    launch = next(line for line in dmd.splitlines() if "fewstep pairs" in line)
    assert "--guidance 1.5 --autoguidance" in launch and launch.rstrip().endswith(weak.name)
    capsys.readouterr()
    cases = [
        (["recipe", str(folder), "--method", "cd", "--weak", str(weak)], "has no real score to autoguide"),
        (["recipe", str(folder), "--method", "dmd2", "--weak", str(teachers["edm"][0])], "does not match the teacher"),
        (["recipe", str(folder), "--method", "dmd2", "--weak", str(tmp_path / "none")], "teacher folder not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
