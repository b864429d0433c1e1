"""Adversarial terms shared by the methods with a GAN stage (DMD2, MSD, CTM, CAF).

Every discriminator here reads *noisy* samples through a diffusion backbone, as DMD2's does
(distribution.md §2.3(c), "diffusion GAN"): a sample x in sigma space is noised to x + sigma·eps,
fed to the backbone exactly as the teacher would be (``NoiseProcess.network_inputs``), and a small
convolutional head classifies the backbone's bottleneck features (``Backbone.bottleneck``). DMD2 puts
the head on the fake-score network, so the encoder is shared with the critic; CTM and CAF use their
own trainable copy of the teacher's encoder (:class:`DiffusionDiscriminator`). No feature network is
downloaded: the projected StyleGAN-XL discriminators of CTM / CAF (DeiT, EfficientNet) are replaced
by this one, which is a departure from those papers.

Heads: one :class:`BottleneckHead` on the bottleneck (DMD2's), or :class:`LevelHeads`, one per feature level
(LADD's; ``gan_heads: levels``), whose logits are (B, L); either with one logit per image or, ``gan_head_grid``
g > 1, a g x g grid of patch logits per head (ADD's heads judge every feature token [R]). Losses are per sample,
(B,): with several heads (or cells) each one's loss is taken on its own logits and the losses are averaged (not
the loss of averaged logits, which would let a confident head hide a wrong one), so the trainer reduces them like
any other loss.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.backbones import Backbone
from fewstep.method_configs import GanHeads, GanLoss
from fewstep.types import Cond

__all__ = [
    "probe_cond",
    "GanHeads",
    "BottleneckHead",
    "LevelHeads",
    "DiffusionDiscriminator",
    "GanLoss",
    "adaptive_weight",
    "approximate_r1",
    "discriminator_loss",
    "generator_loss",
    "head_for",
    "head_logits",
    "level_heads_for",
    "make_head",
    "output_layer",
]



def _norm(channels: int, pixels: int) -> nn.GroupNorm:
    """GroupNorm with DMD2's 32 groups where the map is wide enough, fewer where a group would hold
    fewer than 8 values (a group of one value normalises to a constant and blocks the gradient)."""
    groups = next(g for g in range(min(32, channels), 0, -1)
                  if channels % g == 0 and (channels // g) * pixels >= 8 or g == 1)
    return nn.GroupNorm(groups, channels)


class BottleneckHead(nn.Module):
    """DMD2's classifier head on a (B, D, h, w) bottleneck map (distribution.md §2.3(c)), or with ``grid`` > 1 a
    patch head: a ``grid`` x ``grid`` map of logits, each judging its own region of the image.

    grid 1 (DMD2's): 4x4 stride-2 convolutions halve the map while it is larger than 4x4, a 4x4 stride-4
    convolution takes 4x4 to 1x1 (DMD2 on ImageNet / SD1.5: 8 -> 4 -> 1), each followed by GroupNorm (32
    groups, fewer for narrow maps, see `_norm`) and SiLU, and a 1x1 convolution gives one logit. Maps whose side
    is not 4·2^k are averaged to 1x1 after the last halving.

    grid g > 1: the same halvings while the map is larger than g x g (then averaged to g x g where the side is not
    g·2^k), a 3x3 convolution with GroupNorm and SiLU at g x g, and a 1x1 convolution to one logit per cell:
    the per-position logits of PatchGAN and of ADD's discriminator heads (StyleGAN-T's heads give one logit per
    feature token [R]), coarsened to g x g so that every head, whatever its level's size, gives g² logits and a
    plain mean over them weighs the heads equally. The width stays at D.
    """

    def __init__(self, channels: int, size: int, grid: int = 1) -> None:
        super().__init__()
        if grid > size:
            raise ValueError(f"a {grid}x{grid} grid of logits on a {size}x{size} feature map: the map is smaller "
                             f"than the grid; choose gan_head_grid <= {size}")
        self.grid = grid
        floor = 4 if grid == 1 else grid
        layers: list[nn.Module] = []
        while size > floor and size // 2 >= grid:
            size //= 2
            layers += [nn.Conv2d(channels, channels, 4, 2, 1), _norm(channels, size * size), nn.SiLU()]
        if grid == 1 and size == 4:
            layers += [nn.Conv2d(channels, channels, 4, 4, 0), _norm(channels, 1), nn.SiLU()]
        elif size != grid:
            layers.append(nn.AdaptiveAvgPool2d(grid))
        if grid > 1:
            layers += [nn.Conv2d(channels, channels, 3, 1, 1), _norm(channels, grid * grid), nn.SiLU()]
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """features: (B, D, h, w) -> logits (B,) for grid 1, else (B, grid²)."""
        logits = self.net(features.to(self.net[-1].weight.dtype))
        return logits.reshape(-1) if self.grid == 1 else logits.flatten(1)


@torch.no_grad()
def head_for(backbone: Backbone, sample_shape: tuple[int, int, int], cond: Cond | None = None,
             grid: int = 1) -> BottleneckHead:
    """A :class:`BottleneckHead` (``grid`` x ``grid`` logits) sized for ``backbone``'s bottleneck, found by one dry
    run on zeros.

    cond: a one-sample condition when the backbone needs one (e.g. ``teacher.null_cond(1)``)."""
    x, t = _probe(backbone, sample_shape)
    features = backbone.bottleneck(x, t, cond)
    return BottleneckHead(features.shape[1], _square_side(features, "bottleneck"), grid).to(x.device)


class LevelHeads(nn.Module):
    """One :class:`BottleneckHead` per feature level (``Backbone.features``): LADD's independent discriminator
    heads on the teacher's feature maps [R] (LADD: one per transformer block; here one per level of the
    family, ``Family.feature_levels``). Features list -> logits (B, L·grid²): one column per level, or with
    patch heads its grid² columns, level after level."""

    def __init__(self, shapes: list[tuple[int, int]], grid: int = 1) -> None:
        super().__init__()
        smallest = min(size for _, size in shapes)
        if grid > smallest:  # name the smallest level, whichever head would meet it first
            raise ValueError(f"a {grid}x{grid} grid of logits per head, but the smallest feature level is "
                             f"{smallest}x{smallest}; choose gan_head_grid <= {smallest}")
        self.heads = nn.ModuleList(BottleneckHead(channels, size, grid) for channels, size in shapes)

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature maps for {len(self.heads)} heads")
        return torch.cat([head(f).reshape(f.shape[0], -1) for head, f in zip(self.heads, features)], dim=-1)


def _probe(backbone: Backbone, sample_shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    ref = next(backbone.parameters())
    return (torch.zeros(1, *sample_shape, device=ref.device, dtype=ref.dtype), torch.zeros(1, device=ref.device))


def _square_side(features: Tensor, what: str) -> int:
    if features.shape[-1] != features.shape[-2]:
        raise ValueError(f"{what} map {tuple(features.shape)} is not square; BottleneckHead needs h == w")
    return features.shape[-1]


@torch.no_grad()
def level_heads_for(backbone: Backbone, sample_shape: tuple[int, int, int], cond: Cond | None = None,
                    grid: int = 1) -> LevelHeads:
    """:class:`LevelHeads` (``grid`` x ``grid`` logits each) sized for ``backbone``'s feature levels by one dry run
    on zeros (cond as :func:`head_for`)."""
    x, t = _probe(backbone, sample_shape)
    features = backbone.features(x, t, cond)
    shapes = [(f.shape[1], _square_side(f, f"feature level {i}")) for i, f in enumerate(features)]
    return LevelHeads(shapes, grid).to(x.device)


def make_head(backbone: Backbone, sample_shape: tuple[int, int, int], cond: Cond | None = None,
              kind: GanHeads = "bottleneck", grid: int = 1) -> BottleneckHead | LevelHeads:
    """The discriminator head(s) of ``kind`` for ``backbone``, each with ``grid`` x ``grid`` logits: :func:`head_for`
    or :func:`level_heads_for`."""
    if kind == "levels":
        return level_heads_for(backbone, sample_shape, cond, grid)
    if kind == "bottleneck":
        return head_for(backbone, sample_shape, cond, grid)
    raise ValueError(f"unknown gan_heads {kind!r}; choose bottleneck or levels")


def head_logits(head: nn.Module, backbone: Backbone, x: Tensor, timestep: Tensor, cond: Cond | None = None) -> Tensor:
    """Logits of ``head`` on ``backbone``'s features for the network inputs (x, timestep, cond): (B,) from the
    bottleneck map for a :class:`BottleneckHead`, (B, L) from every level for :class:`LevelHeads`; with patch
    heads (grid g > 1) (B, g²) and (B, L·g²)."""
    if isinstance(head, LevelHeads):
        return head(backbone.features(x, timestep, cond))
    return head(backbone.bottleneck(x, timestep, cond))


def _per_sample(loss: Tensor) -> Tensor:
    """(B,) from per-head losses (B, L), averaged over heads, or from a per-sample loss (B,). Patch heads' columns
    are their cells' losses; every head has as many, so the plain mean still weighs the heads equally."""
    return loss.mean(-1) if loss.ndim == 2 else loss


class DiffusionDiscriminator(nn.Module):
    """A trainable copy of a diffusion backbone's encoder with a :class:`BottleneckHead` (CTM / CAF GAN
    stages in fewstep; see the module docstring). Called like the backbone: network inputs, timestep
    and condition -> logits (B,)."""

    def __init__(self, backbone: Backbone, sample_shape: tuple[int, int, int], cond: Cond | None = None) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone).float().requires_grad_(True)
        self.head = head_for(self.backbone, sample_shape, cond)

    def forward(self, x: Tensor, timestep: Tensor, cond: Cond | None = None) -> Tensor:
        return head_logits(self.head, self.backbone, x, timestep, cond)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: GanLoss = "nonsaturating") -> Tensor:
    """Per-sample discriminator loss (B,) from logits (B,), or (B, L) for L heads (each head's loss, averaged).

    nonsaturating: softplus(D(fake)) + softplus(-D(real)) (DMD2, distribution.md §2.3(c));
    hinge: relu(1 + D(fake)) + relu(1 - D(real)) (CTM, CAF)."""
    if kind == "nonsaturating":
        return _per_sample(F.softplus(fake_logits) + F.softplus(-real_logits))
    if kind == "hinge":
        return _per_sample(F.relu(1 + fake_logits) + F.relu(1 - real_logits))
    raise ValueError(f"unknown GAN loss {kind!r}; choose nonsaturating or hinge")


def approximate_r1(critic, x: Tensor, logits: Tensor, noise: Tensor, std: float) -> Tensor:
    """Per-sample approximated R1 penalty (B,) on real inputs: ((D(x + std·n) − D(x)) / std)², n = ``noise`` ~ N(0, I)
    (the caller draws it, from the step's generators so that runs replay exactly).

    ``critic`` maps a (B, C, H, W) input to logits (B,) (or (B, L) for L heads: each head's penalty, averaged)
    and ``logits`` = critic(x). For a small ``std`` the finite difference is ∇D(x)·n, whose square has expectation
    ||∇D(x)||², so gamma/2 times this term estimates R1's gamma/2 ||∇D(x)||² (ADD's real-data penalty) with one
    more forward pass and no second derivative; APT penalises the same change of D under a small Gaussian
    perturbation of the real input (distribution.md §9 [R]; the scaling by std² is ours, so gamma reads as R1's)."""
    perturbed = critic(x + std * noise)
    return _per_sample(((perturbed - logits) / std).square())


def generator_loss(fake_logits: Tensor, kind: GanLoss = "nonsaturating") -> Tensor:
    """Per-sample generator loss (B,): softplus(-D(fake)) (non-saturating) or -D(fake) (hinge); logits (B, L) of
    L heads: each head's loss, averaged."""
    if kind == "nonsaturating":
        return _per_sample(F.softplus(-fake_logits))
    if kind == "hinge":
        return _per_sample(-fake_logits)
    raise ValueError(f"unknown GAN loss {kind!r}; choose nonsaturating or hinge")


def output_layer(backbone: nn.Module) -> Tensor:
    """The weight of the backbone's last layer (``Backbone.output_layer``: UNets ``conv_out``, DiT
    ``proj_out_2``, SD3/Flux/PixArt/Sana ``proj_out``): where the adaptive GAN weight compares gradient norms."""
    layer = getattr(backbone, "module", backbone).output_layer  # per family (fewstep.families)
    if not layer.weight.requires_grad:  # a frozen base (fewstep.lora): the last trainable weight, the adapter's
        trainable = [p for p in getattr(backbone, "module", backbone).parameters() if p.requires_grad]
        return trainable[-1] if trainable else layer.weight
    return layer.weight


def adaptive_weight(main: Tensor, adversarial: Tensor, layer: Tensor, *, clip: tuple[float, float] = (0.01, 10.0),
                    eps: float = 1e-8) -> Tensor:
    """lambda = ||grad_layer main|| / ||grad_layer adversarial||, detached and clipped (VQGAN-style; CTM
    §7.6 and CAF §8.6 clip it to [0.01, 10]). main, adversarial: scalar losses still attached to the graph;
    layer: a weight both depend on. The graph is kept for the trainer's backward."""
    g_main = torch.autograd.grad(main, layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, layer, retain_graph=True)[0]
    ratio = g_main.norm() / (g_adv.norm() + eps)
    if not math.isfinite(float(ratio)):  # host sync: once per generator step
        ratio = torch.tensor(clip[1], device=layer.device)
    return ratio.clamp(*clip).detach()


def probe_cond(teacher) -> Cond | None:
    """A one-sample condition for a dry run of the teacher's backbone (sizing a head or a discriminator):
    class 0 for class-conditional teachers (which need not have a null class), the null prompt for text
    teachers, none for unconditional ones; plus a zero condition image for an image-conditioned teacher."""
    if teacher.conditioning == "class":
        cond = Cond(labels=torch.zeros(1, dtype=torch.long, device=teacher.device))
    elif teacher.conditioning == "text":
        cond = teacher.null_cond(1)
    else:
        cond = None
    if not teacher.net.image_channels:
        return cond
    _, h, w = teacher.sample_shape
    image = torch.zeros(1, teacher.net.image_channels, h, w, device=teacher.device)
    return (cond if cond is not None else Cond()).with_image(image)
