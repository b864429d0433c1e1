"""Zero-shot editing (fewstep.editing, CM Algorithm 4): projections, the sampler's closed forms with an exact
Gaussian consistency function, and the hook on a tiny CD student end to end."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.editing import (
    BlockAverage,
    ConsistencyDenoiser,
    Everything,
    Luminance,
    Mask,
    Nothing,
    edit_levels,
    edit_sample,
    known_psnr,
    slerp,
)

MU, S, EPS, SMAX = 0.3, 0.5, 0.002, 80.0


def gaussian_consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact consistency function of data N(MU, S^2 I): the PF-ODE flow from sigma to EPS,
    mu + sqrt((S^2 + EPS^2) / (S^2 + sigma^2)) (x - mu) (each coordinate independently)."""
    scale = torch.sqrt((S**2 + EPS**2) / (S**2 + sigma**2)).view(-1, 1, 1, 1)
    return MU + scale * (x - MU)


DEN = ConsistencyDenoiser(gaussian_consistency, EPS, SMAX, renoise_floor=EPS)


def _image(b: int = 2, c: int = 3, h: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, c, h, h), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(h: int = 8) -> torch.Tensor:
    m = torch.ones(1, 1, h, h)
    m[..., h // 4: 3 * h // 4, h // 4: 3 * h // 4] = 0
    return m


OPS = [Mask(_mask()), Luminance(), BlockAverage(2), Nothing(), Everything()]


@pytest.mark.parametrize("op", OPS, ids=lambda o: type(o).__name__)
def test_projections_are_orthogonal(op):
    x, y = _image(seed=1), _image(seed=2)
    px = op.project(x)
    torch.testing.assert_close(op.project(px), px, atol=1e-6, rtol=0)  # idempotent
    # self-adjoint: <P x, y> = <x, P y>, and the complement is orthogonal to the range
    torch.testing.assert_close((px * y).sum(), (x * op.project(y)).sum(), atol=1e-4, rtol=0)
    assert abs(float((op.complement(x) * op.project(y)).sum())) < 1e-4


def test_luminance_basis_is_orthogonal_with_luma_first():
    a = Luminance().basis()
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=a.dtype), atol=1e-12, rtol=0)
    u = torch.tensor([0.299, 0.587, 0.114], dtype=a.dtype)
    torch.testing.assert_close(a[0], u / u.norm())
    # the projection is A^T diag(1, 0, 0) A
    x = _image(b=1)
    p = a.T @ torch.diag(torch.tensor([1.0, 0, 0], dtype=a.dtype)) @ a
    expect = torch.einsum("ij,bjhw->bihw", p.float(), x)
    torch.testing.assert_close(Luminance().project(x), expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("op", OPS[:3], ids=lambda o: type(o).__name__)
@pytest.mark.parametrize("steps", [1, 3])
def test_known_part_is_reproduced(op, steps):
    y = _image()
    out = edit_sample(DEN, y, op, edit_levels(DEN, steps), torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.project(out), op.project(y), atol=1e-6, rtol=0)
    if isinstance(op, Mask):  # a mask is applied exactly: bit-identical known pixels
        assert torch.equal(out * op.mask, y * op.mask)
        assert known_psnr(out, y, op) == math.inf
    assert not torch.allclose(op.complement(out), op.complement(y))  # the rest is the student's


def test_identity_operator_returns_the_input():
    y = _image()
    out = edit_sample(DEN, y, Everything(), edit_levels(DEN, 2), torch.Generator().manual_seed(0))
    assert torch.equal(out, y)


def test_superres_block_average_equals_low_res_input():
    y = _image(h=8)
    op = BlockAverage(4)
    low = op.observe(y)
    out = edit_sample(DEN, op.lift(low), op, edit_levels(DEN, 2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(out, 4), low, atol=1e-6, rtol=0)


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, atol=1e-5, rtol=1e-5)
    # equal-norm endpoints keep their norm along the arc (the point of slerp for Gaussian noise)
    z1 = z1 / z1.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * z0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    mid = slerp(z0, z1, 0.5)
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0)


def test_interpolation_frames_share_the_renoising_draws():
    """With shared re-noising each frame is the sample of its own initial noise alone: frame 0 of a batch
    equals the one-image run from the same noise and generator seed."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 4, 4, generator=g)
    frames = torch.cat([slerp(z[:1], z[1:], a) for a in (0.0, 0.5, 1.0)])
    levels = edit_levels(DEN, 3)
    out = edit_sample(DEN, torch.zeros_like(frames), Nothing(), levels, torch.Generator().manual_seed(0),
                      noise=frames, shared_renoise=True)
    alone = edit_sample(DEN, torch.zeros_like(frames[:1]), Nothing(), levels, torch.Generator().manual_seed(0),
                        noise=frames[:1], shared_renoise=True)
    torch.testing.assert_close(out[:1], alone)


@pytest.mark.parametrize("steps", [1, 2])
def test_gaussian_inpainting_draws_the_exact_conditional_law(steps):
    """Data N(MU, S^2 I) has independent pixels, so the law of the unknown pixels given the known ones is
    N(MU, S^2) (plus the EPS^2 the consistency function stops at). With the exact consistency function the
    completions must have that mean and variance; the first step maps T z to MU + sqrt((S^2+EPS^2)/(S^2+T^2)) T z."""
    n = 4000
    y = torch.full((n, 1, 4, 4), -0.9)
    op = Mask(_mask(4))
    out = edit_sample(DEN, y, op, edit_levels(DEN, steps), torch.Generator().manual_seed(0))
    hole = out[:, :, 1:3, 1:3]
    t = edit_levels(DEN, steps)[0]
    var = (S**2 + EPS**2) * t**2 / (S**2 + t**2) if steps == 1 else S**2 + EPS**2
    se = math.sqrt(var / hole.numel())
    assert abs(float(hole.mean()) - MU) < 5 * se
    assert abs(float(hole.var()) / var - 1) < 0.05
    assert torch.equal(out[:, :, 0], y[:, :, 0])


def test_sdedit_start_level_and_full_strength():
    """SDEdit from a level close to sigma_min keeps the image (the flow barely moves it); the levels start
    where asked."""
    y = _image()
    levels = edit_levels(DEN, 2, start_sigma=0.01)
    assert levels[0] == pytest.approx(0.01)
    out = edit_sample(DEN, y, Nothing(), levels, torch.Generator().manual_seed(0), start=y)
    assert float((out - y).abs().max()) < 0.05
    with pytest.raises(ValueError, match="outside the student's range"):
        edit_levels(DEN, 2, start_sigma=100.0)


def test_flow_map_denoiser_reads_the_jump_to_data_in_sigma_space():
    """Point-mass data at MU: the exact average velocity from t to 0 is (x_t - MU) / t, so the consistency
    function is MU at every sigma-space input and level."""
    from fewstep.editing import flow_map_denoiser

    den = flow_map_denoiser(lambda x, t, s: (x - MU) / t.view(-1, 1, 1, 1), 0.01, 80.0)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 5
    out = den.f(x, torch.tensor([0.05, 1.0, 60.0]))
    torch.testing.assert_close(out, torch.full_like(x, MU), atol=1e-5, rtol=0)


def test_refusals():
    with pytest.raises(ValueError, match="binary"):
        Mask(torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="RGB"):
        Luminance().project(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="must divide"):
        BlockAverage(3).project(torch.zeros(1, 1, 4, 4))


HOOKED = [{"name": "cd", "num_scales": 4}, {"name": "ctm", "num_scales": 6, "num_heun_steps_max": 2}, {"name": "ect"},
          {"name": "tcm", "stage_nimg": 8}, {"name": "meanflow"}, {"name": "flowmap"},
          {"name": "scm", "mode": "scd", "warmup_nimg": 8}, {"name": "ct"}, {"name": "ict"},
          {"name": "sct", "stage_nimg": 8}, {"name": "pcm", "solver_steps": 8, "num_phases": 1},
          {"name": "dmd2", "num_steps": 2}]


@pytest.mark.parametrize("method", HOOKED, ids=lambda m: m["name"])
def test_students_edit_through_the_hook(method, tmp_path):
    """One training step of a tiny student, then every task through fewstep.editing.edit: the known part of
    each output is the input's, the output is finite and inside [-1, 1] where the sampler clamps."""
    from fewstep.editing import edit
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "teacher", process="edm" if method["name"] in ("ect", "sct", "tcm")
                                else "vp")
    trainer, _ = run_tiny(tiny_run_config(teacher, method, steps=1), tmp_path / "run")
    hook, ctx, nets = trainer.pm.hook, trainer.ctx, trainer.nets
    image = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = _mask()
    for task, op in (("inpaint", Mask(mask)), ("superres", BlockAverage(2))):
        out = edit(hook, ctx, nets, task, image, 2, mask=mask, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(op.project(out), op.project(image), atol=1e-5, rtol=0)
        assert torch.isfinite(out).all()
    out = edit(hook, ctx, nets, "sdedit", image, 2, strength=0.3, generator=torch.Generator().manual_seed(0))
    assert out.shape == image.shape and torch.isfinite(out).all()
    frames = edit(hook, ctx, nets, "interpolate", image, 1, num_frames=3, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (3, 1, 8, 8) and torch.isfinite(frames).all()


@pytest.mark.parametrize("method", [{"name": "cd", "num_scales": 8}, {"name": "ct"}], ids=lambda m: m["name"])
def test_consistency_edits_use_the_sampler_levels(method, tmp_path):
    """cd / ct / ict sample on levels of their trained grid (``grid_levels``), and editing takes the same ones: with
    nothing known, the editing sampler from the sampler's noise and generator is the student's own N-step sampler
    (before, edits drew N Karras points instead, levels the student never trained on: 2 steps on cd's 8-point
    grid queried 80 -> 2.5 where the sampler queries 80 -> 1.3)."""
    from fewstep_plugins.cm import trained_grid

    from fewstep.editing import student_denoiser
    from fewstep.sampling import consistency_sigmas, eval_mode, sampler_sigmas, sampling_net
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "teacher", process="edm")
    trainer, _ = run_tiny(tiny_run_config(teacher, method, steps=1), tmp_path / "run")
    hook, ctx, nets = trainer.pm.hook, trainer.ctx, trainer.nets
    den = student_denoiser(hook, ctx, nets, None)
    grid = trained_grid(ctx.method, nets.teacher.process)
    for n in (2, 3):
        levels = sampler_sigmas(ctx.method.sample_sigmas, n, grid)
        assert edit_levels(den, n) == levels
        if method["name"] == "cd":  # ct's final grid (151 Karras points) happens to hold them at 2 and 3 steps
            assert levels != consistency_sigmas(n, den.sigma_min, den.sigma_max, den.rho)
        noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        with eval_mode(sampling_net(nets)), torch.no_grad():
            sampled = hook.fewstep_sample(ctx=ctx, nets=nets, noise=noise, cond=None, num_steps=n,
                                          generator=torch.Generator().manual_seed(1))
            edited = edit_sample(den, torch.zeros_like(noise), Nothing(), edit_levels(den, n),
                                 torch.Generator().manual_seed(1), noise=noise)
        torch.testing.assert_close(edited, sampled, atol=1e-6, rtol=0)
    assert edit_levels(den, 2, start_sigma=1.0)[0] == 1.0  # SDEdit starts where the user asks


def test_strength_keeps_the_last_steps_as_diffusers_img2img():
    from fewstep.editing import strength_levels

    assert strength_levels([4.0, 3.0, 2.0, 1.0], 0.5) == [2.0, 1.0]
    assert strength_levels([4.0, 3.0, 2.0, 1.0], 0.7) == [2.0, 1.0]  # int(4 * 0.7) = 2 steps
    assert strength_levels([4.0, 3.0, 2.0, 1.0], 0.75) == [3.0, 2.0, 1.0]
    assert strength_levels([2.0, 1.0], 0.5) == [1.0] and strength_levels([2.0, 1.0], 1.0) == [2.0, 1.0]
    with pytest.raises(ValueError, match="keeps no step"):
        strength_levels([1.0], 0.5)


def test_known_part_renoised_with_the_initial_noise_as_diffusers_inpainting():
    """known_initial_noise: every later input's known part is y + tau z_0 (z_0 the first draw), the unknown part
    the estimate plus the fresh draw; the output's known part is y."""
    seen = []

    def f(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return 0.5 * x

    den = ConsistencyDenoiser(f, EPS, SMAX, renoise_floor=0.0)
    y, mask = _image(c=1), _mask()
    out = edit_sample(den, y, Mask(mask), [3.0, 2.0, 1.0], torch.Generator().manual_seed(0), start=y,
                      known_initial_noise=True)
    g = torch.Generator().manual_seed(0)
    z0, z1, z2 = (torch.randn(y.shape, generator=g) for _ in range(3))
    torch.testing.assert_close(seen[0], y + 3.0 * z0)
    x0 = y * mask + 0.5 * seen[0] * (1 - mask)
    for x, tau, z in ((seen[1], 2.0, z1), (seen[2], 1.0, z2)):
        torch.testing.assert_close(x * mask, (y + tau * z0) * mask, atol=1e-6, rtol=0)
        torch.testing.assert_close(x * (1 - mask), (x0 + tau * z) * (1 - mask), atol=1e-6, rtol=0)
        x0 = y * mask + 0.5 * x * (1 - mask)
    assert torch.equal(out * mask, y * mask)


def test_methods_without_a_consistency_function_are_refused(tmp_path):
    from fewstep.editing import edit
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "teacher", conditioning="class")
    method = {"name": "msd", "num_students": 2, "ratio": 2, "adm_nimg": 2}  # routes noise to several students
    trainer, _ = run_tiny(tiny_run_config(teacher, method, steps=1, plugins={"disable": ["ema"]}), tmp_path / "run")
    with pytest.raises(ValueError, match="offers no consistency function"):
        edit(trainer.pm.hook, trainer.ctx, trainer.nets, "inpaint", torch.zeros(1, 1, 8, 8), 1, mask=_mask())


def test_edit_command_and_pipeline_method_on_an_export(tmp_path):
    """`fewstep edit EXPORT --task inpaint` writes the grid; FewStepPipeline.edit keeps the known pixels."""
    import numpy as np
    from PIL import Image

    from fewstep.cli import main
    from fewstep.export import FewStepPipeline, export_run
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "teacher")
    trainer, _ = run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=1), tmp_path / "run")
    folder = export_run(trainer.pm.hook, trainer.ctx, trainer.nets, tmp_path / "export")
    pipe = FewStepPipeline.from_pretrained(folder)
    image = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = pipe.edit(image, "inpaint", 2, mask=_mask(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out * _mask(), image * _mask())
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray((_mask()[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    grid = tmp_path / "edit.png"
    assert main(["edit", str(folder), "--task", "inpaint", "--image", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "2", "--out", str(grid)]) == 0
    assert grid.is_file()


def test_colorization_of_an_rgb_student_keeps_the_luminance(tmp_path):
    from fewstep.editing import edit
    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    teacher = make_tiny_teacher(tmp_path / "teacher", channels=3)
    trainer, _ = run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=1, data={"channels": 3}),
                          tmp_path / "run")
    image = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = edit(trainer.pm.hook, trainer.ctx, trainer.nets, "colorize", image, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(Luminance().observe(out), Luminance().observe(image), atol=1e-5, rtol=0)
    assert float(Luminance().complement(out - image).abs().max()) > 1e-3  # the chroma is the student's


def test_editing_benchmark_example_on_a_class_conditional_run(tmp_path):
    """examples/editing_fashion.py on a tiny class-conditional CD run with the digits as data and a tiny
    feature network: the known part is exact (inpaint) or its block averages match (superres), the FIDs are
    fewstep.evaluation's (sdedit's input is superres's block image: the same input FID), json and grid written."""
    import importlib.util
    import json
    from pathlib import Path

    from fewstep.testing import make_tiny_teacher, run_tiny, tiny_run_config

    class PooledPixels(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)

    features = tmp_path / "features.pt"
    torch.jit.script(PooledPixels()).save(str(features))
    script = Path(__file__).parents[1] / "examples" / "editing_fashion.py"
    spec = importlib.util.spec_from_file_location("editing_fashion", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    teacher = make_tiny_teacher(tmp_path / "teacher", conditioning="class")
    run_tiny(tiny_run_config(teacher, {"name": "cd", "num_scales": 4}, steps=1), tmp_path / "run")
    out = tmp_path / "bench"
    assert example.main([str(tmp_path / "run" / "export"), str(out), "--data", "digits", "--num", "16", "--batch", "8",
                         "--features", str(features)]) == 0
    r = json.loads((out / "editing.json").read_text())
    tasks = r["tasks"]
    assert tasks["inpaint"]["known_part"] == {"psnr_db": "inf", "max_abs_error": 0.0}
    assert tasks["superres"]["known_part"]["max_abs_error"] < 1e-5
    assert tasks["sdedit"]["known_part"] is None
    assert tasks["sdedit"]["input"] == tasks["superres"]["input"]
    for m in tasks.values():
        assert math.isfinite(m["output"]["fid"]) and math.isfinite(m["whole_vs_original"]["psnr"])
    assert r["num"] == 16 and (out / "editing.png").is_file()
    with pytest.raises(ValueError, match="--num must be in"):
        example.run_benchmark(tmp_path / "run" / "export", out, data="digits", num=4, features=features)
