"""A hand-written consistency-distillation loop: the same maths as ``fewstep distill recipes/digits/cd.yaml``
written the way a one-file research script would, as the reference of the paired benchmark
(examples/paired_bench.py, docs/SPEED.md).

Per step (CM §2.3, the recipe's settings): a batch of digits x0, z ~ N(0, I), an adjacent pair
(s_hi, s_lo) of the 6-point Karras grid on [teacher sigma_min, 80]; one Heun step of the frozen VP
v-prediction teacher from x_hi = x0 + s_hi z to x_lo (2 teacher passes); the student's consistency
function at (x_hi, s_hi) with gradients and at (x_lo, s_lo) without (stop-gradient target, mu = 0);
mean squared error, backward, Adam, and the evaluation EMA (half-life 4000 images, ramp-up 0.05).
4 UNet passes, 1 backward, 1 Adam step: what a fewstep CD step does, minus the framework.

The same non-finite guard as fewstep's (docs/RELIABILITY.md), unless ``--no-guard``: the gradient norm (one
``_foreach_norm``) and a device flag that makes torch's fused Adam skip a step whose loss or gradient norm is
not finite. Adam is the fused kernel either way, as in fewstep (the kernel that takes the flag).

    OMP_NUM_THREADS=1 python examples/hand_cd_loop.py --steps 10 --warmup 2

prints one JSON line: seconds per measured step and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

TEACHER = Path(__file__).resolve().parent.parent / "recipes" / "digits" / "teacher"
SIGMA_MAX, NUM_SCALES, RHO, SIGMA_DATA = 80.0, 6, 7.0, 0.5  # recipes/digits/cd.yaml; CM's sigma_d
BATCH, LR, HALFLIFE, RAMPUP = 32, 3e-4, 4000.0, 0.05


def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits, upsampled to the teacher's 16x16, in [-1, 1]: (1797, 1, 16, 16)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    return torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False) * 2 - 1


class VPDenoiser:
    """D(x, sigma) of a v-prediction DDPM network in sigma space (x = x0 + sigma eps)."""

    def __init__(self, scheduler: DDPMScheduler) -> None:
        ac = scheduler.alphas_cumprod.double()
        self.log_sigmas = (0.5 * (torch.log1p(-ac) - torch.log(ac))).float()
        self.sigma_min = math.exp(self.log_sigmas[0].item())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep index, linear in log sigma between the discrete levels."""
        log_s = sigma.log()
        i = (torch.searchsorted(self.log_sigmas, log_s, right=True) - 1).clamp(0, len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[i], self.log_sigmas[i + 1]
        return i + (log_s - lo) / (hi - lo)

    def __call__(self, net: UNet2DModel, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha = torch.rsqrt(1 + sigma**2)[:, None, None, None]
        s = sigma[:, None, None, None] * alpha
        x_t = alpha * x
        v = net(x_t, self.timestep(sigma)).sample
        return alpha * x_t - s * v  # x0 = alpha x_t - sigma_vp v


def consistency(denoiser: VPDenoiser, net: UNet2DModel, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """CM's boundary scalings around the denoiser: f(x, sigma_min) = x (CM §1)."""
    smin, sd = denoiser.sigma_min, SIGMA_DATA
    c_skip_cm = sd**2 / ((sigma - smin) ** 2 + sd**2)
    c_skip_edm = sd**2 / (sigma**2 + sd**2)
    r = (sigma - smin) / sigma
    x0 = denoiser(net, x, sigma)
    return (c_skip_cm - r * c_skip_edm)[:, None, None, None] * x + r[:, None, None, None] * x0


class HandCD:
    """The loop's state; :meth:`step` takes one optimizer step and returns the loss (a tensor: no host sync)."""

    def __init__(self, seed: int = 0, guard: bool = True) -> None:
        torch.manual_seed(seed)
        self.guard = guard
        self.data = digits()
        self.teacher = UNet2DModel.from_pretrained(TEACHER / "unet").eval().requires_grad_(False)
        self.denoiser = VPDenoiser(DDPMScheduler.from_pretrained(TEACHER / "scheduler"))
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.ema = copy.deepcopy(self.student).requires_grad_(False)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=LR, fused=True)
        ramp = torch.linspace(0, 1, NUM_SCALES, dtype=torch.float64)
        hi, lo = SIGMA_MAX ** (1 / RHO), self.denoiser.sigma_min ** (1 / RHO)
        self.grid = ((hi + ramp * (lo - hi)) ** RHO).float()
        self.ema_params, self.student_params = list(self.ema.parameters()), list(self.student.parameters())
        self.nimg = 0

    def step(self) -> torch.Tensor:
        teacher, student, denoiser, grid = self.teacher, self.student, self.denoiser, self.grid
        x0 = self.data[torch.randint(0, len(self.data), (BATCH,))]
        z = torch.randn_like(x0)
        n = torch.randint(0, NUM_SCALES - 1, (BATCH,))
        s_hi, s_lo = grid[n], grid[n + 1]
        x_hi = x0 + s_hi[:, None, None, None] * z
        with torch.no_grad():  # one Heun step of the teacher (EDM Alg. 1), s_lo > 0 on this grid
            d = (x_hi - denoiser(teacher, x_hi, s_hi)) / s_hi[:, None, None, None]
            x_eu = x_hi + (s_lo - s_hi)[:, None, None, None] * d
            d2 = (x_eu - denoiser(teacher, x_eu, s_lo)) / s_lo[:, None, None, None]
            x_lo = x_hi + (s_lo - s_hi)[:, None, None, None] * (d + d2) / 2
            target = consistency(denoiser, student, x_lo, s_lo)
        online = consistency(denoiser, student, x_hi, s_hi)
        loss = (online - target).square().flatten(1).mean(1).mean()
        loss.backward()
        if self.guard:  # fused Adam leaves weights and moments untouched where found_inf is 1
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.student_params])))
            self.opt.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
            self.opt.grad_scale = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.nimg += BATCH
        beta = 0.5 ** (BATCH / max(min(HALFLIFE, self.nimg * RAMPUP), 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.student_params, 1 - beta)
        return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-guard", action="store_true", help="no gradient norm, no non-finite skip")
    args = parser.parse_args()
    loop = HandCD(args.seed, guard=not args.no_guard)
    for _ in range(args.warmup):
        loop.step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = loop.step()
    seconds = (time.perf_counter() - t0) / args.steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loop": "hand", "step_s": seconds, "peak_memory_mb": peak_mb, "loss": loss.item()}))


if __name__ == "__main__":
    main()
