"""Zero-shot editing with consistency-type students: consistency sampling with a known linear degradation.

CM Algorithm 4 (Song et al. 2023, "Consistency Models", §5 and Appendix D): multistep consistency sampling
where, after every evaluation of the consistency function f, the part of the image that the observation
y fixes is put back. With P the orthogonal projection onto the known subspace (CM writes it with an
orthogonal operator A and a binary mask Omega on A's coefficients: P = A^T (1 - Omega) A),

    x <- P y + tau_1 z;  x <- f(x, tau_1);  x <- P y + (I - P) x
    for tau in tau_2 > ... > tau_N:  x <- x + sqrt(tau^2 - eps^2) z;  x <- f(x, tau);  x <- P y + (I - P) x

so the known part of the output is P y (up to one float rounding of the projection) and the rest is the
student's completion. The tasks are the paper's:

- inpainting: P = diag(mask), mask 1 where a pixel is known;
- colorization: per pixel, the projection onto the luminance direction u = w / |w| of the RGB weights w
  (the rest of A is an orthonormal basis of u's complement, :meth:`Luminance.basis`);
- super-resolution: P = the block average over k x k patches, repeated over the patch (the orthogonal
  projection onto images constant on each patch);
- stroke-guided generation (SDEdit): nothing known (P = 0), the chain starts from the user's image noised
  to a chosen level instead of from pure noise;
- interpolation: nothing known, the initial noise is the spherical interpolation of two noises;
- img2img: diffusers' image-to-image rule on the student's own N-step sampler: the last int(N * strength) of its
  levels, from the image noised to the first kept one (with a mask: diffusers' inpainting with a plain UNet,
  the known part re-noised with the initial noise at every level), so that fewstep and the stock
  ``...Img2ImgPipeline`` / ``...InpaintPipeline`` on a stock export give the same images (docs/EDITING.md).

A method opts in with the hook ``fewstep_denoiser`` (returns a :class:`ConsistencyDenoiser`: its
consistency function in sigma space and its level range). The operators act on model space, which is
pixel space for pixel teachers; for latent teachers only ``sdedit`` and ``interpolate`` are offered.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.sampling import consistency_sigmas, eval_mode

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B,C,H,W), sigma (B,)) -> x0 estimate (B,C,H,W)

TASKS = ("inpaint", "colorize", "superres", "sdedit", "interpolate", "img2img")

# ITU-R BT.601 luma weights; CM's colorization uses a luminance operator of this kind (the exact weights
# of the official code are not verified here).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ConsistencyDenoiser:
    """A student's consistency function for editing (what ``fewstep_denoiser`` returns).

    f: (x (B,C,H,W) at level sigma (B,)) -> its estimate of the clean sample in model space;
    sigma_min / sigma_max: the levels the student was trained on (sigma space, ``fewstep.diffusion``);
    renoise_floor: re-noising from a clean estimate to tau adds sqrt(tau^2 - floor^2) z (CM: sigma_min;
    ECT / sCM samplers: 0); clamp: bound every estimate to [-1, 1] (pixel students, as their samplers do);
    levels: N -> the N descending levels of the method's own N-step sampler where they are not the Karras
    points :func:`edit_levels` draws (DMD2: its generator levels), None otherwise."""

    f: Denoiser
    sigma_min: float
    sigma_max: float
    renoise_floor: float
    clamp: bool = False
    rho: float = 7.0
    levels: Callable[[int], list[float]] | None = None


def flow_map_denoiser(F_fn: Callable[[Tensor, Tensor, Tensor], Tensor], sigma_min: float, sigma_max: float,
                      clamp: bool = False) -> ConsistencyDenoiser:
    """The consistency function of a flow-map student (flowmap, meanflow): its jump to flow time 0,
    x0 = x_t - t F(x_t, t, 0), read in sigma space (x_t = x / (1 + sigma), t = sigma / (1 + sigma)).
    F_fn: (x_t (B,C,H,W), t (B,), s (B,)) -> average velocity; re-noising from 0, as their samplers."""
    def f(x: Tensor, sigma: Tensor) -> Tensor:
        t = sigma / (1 + sigma)
        x_t = x / (1 + sigma).view(-1, *([1] * (x.ndim - 1)))
        return x_t - t.view(-1, *([1] * (x.ndim - 1))) * F_fn(x_t, t, torch.zeros_like(t))

    return ConsistencyDenoiser(f, sigma_min, sigma_max, renoise_floor=0.0, clamp=clamp)


# ------------------------------------------------------------------------------------------------
# Known linear degradations, as orthogonal projections P onto the known subspace


class Projection(ABC):
    """Orthogonal projection P onto the part of an image an observation fixes (P = P^T = P^2)."""

    @abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """P x for x: (B, C, H, W)."""

    def complement(self, x: Tensor) -> Tensor:
        """(I - P) x: the part the student completes."""
        return x - self.project(x)


class Nothing(Projection):
    """Nothing known (P = 0): SDEdit and interpolation."""

    def project(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class Everything(Projection):
    """Everything known (P = I): the sampler returns the observation."""

    def project(self, x: Tensor) -> Tensor:
        return x


@dataclass
class Mask(Projection):
    """Inpainting: P = diag(mask). mask: (B or 1, C or 1, H, W), 1 where a pixel is known, 0 where not."""

    mask: Tensor

    def __post_init__(self) -> None:
        if not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise ValueError("inpainting mask must be binary (1 = known, 0 = to fill); threshold it first")

    def project(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.device, x.dtype)


@dataclass
class Luminance(Projection):
    """Colorization: per pixel, the projection onto u = w / |w| in RGB space (the luminance direction)."""

    weights: tuple[float, float, float] = LUMA_WEIGHTS

    def basis(self) -> Tensor:
        """A: (3, 3) orthogonal, row 0 = u, rows 1-2 an orthonormal basis of u's complement (CM's A)."""
        u = torch.tensor(self.weights, dtype=torch.float64)
        u = u / u.norm()
        q, _ = torch.linalg.qr(torch.cat([u[:, None], torch.eye(3, dtype=torch.float64)], dim=1))
        q = q * torch.sign(q[:, :1].T @ u)  # column 0 = +u
        return q.T

    def project(self, x: Tensor) -> Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"colorization needs RGB images (3 channels), got {x.shape[1]} channels")
        u = self.basis()[0].to(x.device, x.dtype).view(1, 3, 1, 1)
        return u * (x * u).sum(dim=1, keepdim=True)

    def observe(self, image: Tensor) -> Tensor:
        """The grey image (B, 1, H, W) the operator keeps: u . x (luminance up to the factor |w|)."""
        u = self.basis()[0].to(image.device, image.dtype).view(1, 3, 1, 1)
        return (image * u).sum(dim=1, keepdim=True)


@dataclass
class BlockAverage(Projection):
    """Super-resolution: P x = the k x k block average of x, repeated over each block."""

    factor: int

    def project(self, x: Tensor) -> Tensor:
        return self.lift(self.observe(x))

    def observe(self, x: Tensor) -> Tensor:
        """The low-resolution image (B, C, H/k, W/k) the operator keeps."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"super-resolution factor {self.factor} must divide the image size {tuple(x.shape[-2:])}")
        return F.avg_pool2d(x, self.factor)

    def lift(self, low: Tensor) -> Tensor:
        """A low-resolution image to the block-constant full-resolution image (P of it is itself)."""
        return low.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)


# ------------------------------------------------------------------------------------------------
# The sampler


def _levels(x: Tensor, sigma: float) -> Tensor:
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)


def _draw(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def edit_sample(den: ConsistencyDenoiser, y: Tensor, op: Projection, sigmas: list[float],
                generator: torch.Generator | None = None, start: Tensor | None = None,
                noise: Tensor | None = None, shared_renoise: bool = False, known_initial_noise: bool = False) -> Tensor:
    """CM Algorithm 4 on levels ``sigmas`` (descending). y: (B, C, H, W) observation in model space (only
    P y is read). The first input is ``start`` (default P y, the paper's choice) plus sigmas[0] times
    ``noise`` (default drawn from ``generator``); every later level re-noises with fresh draws, one draw for
    the whole batch when ``shared_renoise`` (interpolation frames then differ only by their initial noise).
    known_initial_noise: re-noise the known part with the initial noise instead of the fresh draw, as
    diffusers' inpainting pipelines do with a plain (4-channel) UNet: x <- P (y + tau z_0) + (I - P) (x + tau z)."""
    known = op.project(y)

    def step(x: Tensor, sigma: float) -> Tensor:
        out = den.f(x, _levels(x, sigma))
        if den.clamp:
            out = out.clamp(-1.0, 1.0)
        return known + op.complement(out)

    base = known if start is None else start
    z0 = _draw(y.shape, y, generator) if noise is None else noise
    x = step(base + sigmas[0] * z0, sigmas[0])
    for tau in sigmas[1:]:
        z = _draw((1, *y.shape[1:]) if shared_renoise else y.shape, y, generator)
        r = math.sqrt(max(tau**2 - den.renoise_floor**2, 0.0))
        x = x + r * z
        if known_initial_noise:
            x = op.complement(x) + op.project(y + r * z0)
        x = step(x, tau)
    return x


def edit_levels(den: ConsistencyDenoiser, num_steps: int, start_sigma: float | None = None) -> list[float]:
    """The N levels of the editing sampler: the student's own N-step sampler levels (``den.levels``) when it
    declares them and no ``start_sigma`` is given, else the first N of an (N+1)-point Karras grid from
    ``start_sigma`` (default the student's sigma_max; SDEdit's strength) to sigma_min, as the consistency
    sampler's."""
    if den.levels is not None and start_sigma is None:
        return [float(s) for s in den.levels(num_steps)]
    hi = den.sigma_max if start_sigma is None else start_sigma
    if not den.sigma_min < hi <= den.sigma_max:
        raise ValueError(f"start level {hi} outside the student's range ({den.sigma_min}, {den.sigma_max}]")
    return consistency_sigmas(num_steps, den.sigma_min, hi, den.rho)


def strength_levels(levels: list[float], strength: float) -> list[float]:
    """diffusers' image-to-image rule (``get_timesteps`` of its img2img and inpainting pipelines): of an N-step
    schedule, keep the last min(int(N * strength), N) levels (0.5 of 4 steps: the last 2; of 2 steps: the last 1)."""
    if not 0 < strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    n = len(levels)
    keep = min(int(n * strength), n)
    if keep < 1:
        raise ValueError(f"strength {strength} of {n} steps keeps no step (diffusers' rule: int(steps * strength) "
                         f"= {keep}); raise --steps or --strength")
    return levels[n - keep:]


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask (B or 1, 1, H, W) on the latent grid ``size``, as diffusers' inpainting pipelines resize it
    (``interpolate`` with its default nearest mode)."""
    return F.interpolate(mask.float(), size=size)


def slerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation per sample (CM §5 interpolation): sin((1-a) th)/sin th z0 + sin(a th)/sin th z1,
    th the angle between the flattened z0 and z1. alpha 0 gives z0, 1 gives z1."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1.0, 1.0)
    theta = torch.acos(cos).view(-1, *([1] * (z0.ndim - 1)))
    small = theta.abs() < 1e-6  # parallel noises: linear interpolation is the limit
    s = torch.sin(theta).clamp_min(1e-12)
    out = torch.sin((1 - alpha) * theta) / s * z0 + torch.sin(alpha * theta) / s * z1
    return torch.where(small, (1 - alpha) * z0 + alpha * z1, out)


# ------------------------------------------------------------------------------------------------
# Driving a student (run or export)


def student_denoiser(hook: Any, ctx: Any, nets: Any, cond: Any) -> ConsistencyDenoiser:
    """The student's consistency function through the ``fewstep_denoiser`` hook, or a clear refusal."""
    den = hook.fewstep_denoiser(ctx=ctx, nets=nets, cond=cond)
    if den is None:
        raise ValueError(f"method {ctx.method.name!r} offers no consistency function for editing (hook "
                         "fewstep_denoiser); zero-shot editing needs a consistency-type student (cd, ct, ict, ect, "
                         "sct, scm, ctm, tcm, ...)")
    return den


def operator(task: str, image: Tensor, mask: Tensor | None = None, factor: int = 2) -> tuple[Projection, Tensor]:
    """The projection of ``task`` and the observation y in model space from a full-size image (B, C, H, W)
    in [-1, 1] (inpaint: ``mask`` (1 or B, 1 or C, H, W), 1 = known)."""
    if task == "inpaint":
        if mask is None:
            raise ValueError("--task inpaint needs --mask (white = known, black = to fill)")
        return Mask(mask), image
    if task == "colorize":
        return Luminance(), image
    if task == "superres":
        return BlockAverage(factor), image
    if task in ("sdedit", "interpolate"):
        return Nothing(), image
    raise ValueError(f"unknown editing task {task!r}; choose one of {', '.join(TASKS)}")


@torch.no_grad()
def edit(hook: Any, ctx: Any, nets: Any, task: str, image: Tensor, num_steps: int, *, mask: Tensor | None = None,
         factor: int = 2, strength: float = 0.5, cond: Any = None, generator: torch.Generator | None = None,
         num_frames: int = 8) -> Tensor:
    """Edit ``image`` (B, *data_shape) in [-1, 1] with the run's or export's student; images in data space.

    strength (sdedit): the start level as a fraction of the way from sigma_min to sigma_max on the Karras
    scale (0: the image itself, 1: pure noise); (img2img): the fraction of the N-step schedule that runs
    (:func:`strength_levels`), with ``mask`` (1 = known, 0 = to fill; on the latent grid for latent students)
    diffusers' inpainting. interpolate: ``num_frames`` images between two noises (the first two rows of
    ``generator``'s draws), one row per image of the batch."""
    teacher = nets.teacher
    latent = teacher.vae is not None
    if latent and task not in ("sdedit", "interpolate", "img2img"):
        raise ValueError(f"--task {task} acts on pixels, and this student samples VAE latents; only sdedit, img2img "
                         "(with --mask: inpainting on the latent grid) and interpolate are offered for latent students")
    den = student_denoiser(hook, ctx, nets, cond)
    y = teacher.encode(image.to(ctx.device).float()).float() if latent else image.to(ctx.device).float()
    with eval_mode(*[nets.get(n) for n in nets.names()]):
        if task == "interpolate":
            z = torch.randn((2, *y.shape[1:]), generator=generator).to(y)
            frames = torch.cat([slerp(z[:1], z[1:], a) for a in torch.linspace(0, 1, num_frames).tolist()])
            out = edit_sample(den, torch.zeros_like(frames), Nothing(), edit_levels(den, num_steps), generator,
                              noise=frames, shared_renoise=True)
        elif task == "sdedit":
            if not 0 < strength <= 1:
                raise ValueError(f"--strength must be in (0, 1], got {strength}")
            lo, hi, rho = den.sigma_min, den.sigma_max, den.rho
            start = (lo ** (1 / rho) + strength * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho
            out = edit_sample(den, y, Nothing(), edit_levels(den, num_steps, start), generator, start=y)
        elif task == "img2img":
            levels = strength_levels(edit_levels(den, num_steps), strength)
            if mask is None:
                out = edit_sample(den, y, Nothing(), levels, generator, start=y)
            else:
                op = Mask((latent_mask(mask, tuple(y.shape[-2:])) if latent else mask).to(y.device))
                out = edit_sample(den, y, op, levels, generator, start=y, known_initial_noise=True)
        else:
            op, obs = operator(task, y, mask, factor)
            out = edit_sample(den, obs, op, edit_levels(den, num_steps), generator)
    return teacher.decode(out).float().cpu()


def degraded_view(task: str, image: Tensor, mask: Tensor | None = None, factor: int = 2) -> Tensor:
    """What the user gives for ``task`` (for grids): the masked image (grey where unknown), the grey image,
    the block-averaged image, or the image itself."""
    if task in ("inpaint", "img2img") and mask is not None:
        return image * mask
    if task == "colorize":
        return Luminance().project(image)
    if task == "superres":
        return BlockAverage(factor).project(image)
    return image


def middle_rows_mask(size: int) -> Tensor:
    """The benchmark inpainting mask (1, 1, size, size): 1 (known) except the middle half of the rows."""
    mask = torch.ones(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, :] = 0
    return mask


BENCHMARK_TASKS = ("inpaint", "superres", "sdedit")


def benchmark_edits(hook: Any, ctx: Any, nets: Any, images: Tensor, num_steps: int, *,
                    tasks: tuple[str, ...] = BENCHMARK_TASKS, factor: int = 4, strength: float = 0.5,
                    cond: Any = None, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """The editing benchmark (docs/EDITING.md) on ``images`` (B, C, H, W) in [-1, 1]: inpainting with the
    middle half of the rows unknown (:func:`middle_rows_mask`), ``factor`` x ``factor`` super-resolution, and
    SDEdit at ``strength`` from the ``factor`` x ``factor`` block image as a stroke painting. Each task draws
    its noise from a generator seeded with ``seed``. Returns {task: (the input as the user gives it, output)}."""
    unknown = set(tasks) - set(BENCHMARK_TASKS)
    if unknown:
        raise ValueError(f"benchmark tasks are {', '.join(BENCHMARK_TASKS)}; got {', '.join(sorted(unknown))}")
    mask = middle_rows_mask(images.shape[-1])
    blocks = BlockAverage(factor).project(images)
    kwargs = {"inpaint": {"mask": mask}, "superres": {"factor": factor}, "sdedit": {"strength": strength}}
    out = {}
    for task in tasks:
        source = blocks if task == "sdedit" else images
        result = edit(hook, ctx, nets, task, source, num_steps, cond=cond,
                      generator=torch.Generator().manual_seed(seed), **kwargs[task])
        out[task] = (degraded_view(task, images, mask, factor) if task != "sdedit" else blocks, result)
    return out


def benchmark_grid_rows(images: Tensor, edits: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Grid rows of :func:`benchmark_edits`: the originals, the inpainting mask (grey = known, black = to
    fill) when inpainting ran, then each task's input and output."""
    rows = {"original": images}
    if "inpaint" in edits:
        rows["inpaint mask"] = (middle_rows_mask(images.shape[-1]) - 1).expand_as(images)
    for task, (given, result) in edits.items():
        rows[f"{task} input"], rows[f"{task} output"] = given, result
    return rows


def known_psnr(output: Tensor, image: Tensor, op: Projection) -> float:
    """PSNR (dB, peak-to-peak 2 for [-1, 1]) between the known parts P output and P image; inf when equal."""
    mse = float((op.project(output) - op.project(image)).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def read_image(path: Path, shape: tuple[int, ...]) -> Tensor:
    """A PNG/JPEG as (1, C, H, W) in [-1, 1], resized to (H, W) and converted to C = 1 (L) or 3 (RGB)."""
    import numpy as np
    from PIL import Image

    channels, height, width = shape
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    t = torch.from_numpy(arr)
    return (t[None, None] if channels == 1 else t.permute(2, 0, 1)[None]).contiguous()


def load_student(path: Path) -> tuple[Any, Any, Any]:
    """(hook, ctx, nets) of an export (``fewstep export``) or of a run folder (its latest checkpoint)."""
    from fewstep.cli import _built_run
    from fewstep.export import EXPORT_META, load_export

    if (Path(path) / EXPORT_META).is_file():
        loaded = load_export(path, device="cuda" if torch.cuda.is_available() else "cpu")
        return loaded.hook, loaded.ctx, loaded.nets
    trainer, pm = _built_run(Path(path))
    return pm.hook, trainer.ctx, trainer.nets


def cmd_edit(args: Any) -> int:
    """``fewstep edit RUN|EXPORT --task ... --image PATH [--mask PATH] --steps N --out PATH``."""
    from fewstep.export import condition
    from fewstep.images import save_grid_rows

    hook, ctx, nets = load_student(args.run)
    teacher = nets.teacher
    shape = teacher.data_shape
    image = read_image(args.image, shape)
    mask = None
    if args.mask is not None:
        mask = (read_image(args.mask, (1, *shape[1:])) > 0).float()
    n = args.frames if args.task == "interpolate" else 1
    cond = condition(teacher, n, [args.label] if teacher.conditioning == "class" else None,
                     args.prompt if teacher.conditioning == "text" else None)
    out = edit(hook, ctx, nets, args.task, image, args.steps, mask=mask, factor=args.factor, strength=args.strength,
               cond=cond, generator=torch.Generator().manual_seed(args.seed), num_frames=args.frames)
    rows = {"output": out} if args.task == "interpolate" else {
        "input": degraded_view(args.task, image, mask, args.factor), "output": out}
    if args.task not in ("sdedit", "interpolate", "img2img"):  # img2img's known part may be latent
        op, _ = operator(args.task, image, mask, args.factor)
        print(f"PSNR of the known part: {known_psnr(out, image, op):.2f} dB")
    save_grid_rows(rows, args.out, upscale=ctx.config.validation.upscale)
    print(f"wrote {args.out}")
    return 0
