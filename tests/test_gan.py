"""fewstep.gan: heads on the three backbones' bottlenecks, the losses' closed forms, the adaptive weight, the
approximated R1 penalty against the exact one."""

import pytest
import torch
import torch.nn.functional as F

from fewstep.backbones import Backbone
from fewstep.gan import (
    BottleneckHead,
    DiffusionDiscriminator,
    LevelHeads,
    adaptive_weight,
    approximate_r1,
    discriminator_loss,
    generator_loss,
    head_for,
    level_heads_for,
    output_layer,
)
from fewstep.testing import tiny_dit, tiny_unet, tiny_unet_condition
from fewstep.types import Cond


def _backbone(kind: str, size: int = 8) -> tuple[Backbone, Cond | None]:
    if kind == "unet":
        return Backbone(tiny_unet(size)), None
    if kind == "unet_condition":
        return Backbone(tiny_unet_condition(size)), Cond(embeddings=torch.randn(1, 16, 32))
    return Backbone(tiny_dit(size)), Cond(labels=torch.tensor([3]))


@pytest.mark.parametrize("kind", ["unet", "unet_condition", "dit"])
@pytest.mark.parametrize("size", [8, 16])
def test_head_on_every_backbone_gives_one_logit_and_passes_gradients(kind, size):
    backbone, cond = _backbone(kind, size)
    head = head_for(backbone, (1, size, size), cond)
    x = torch.randn(2, 1, size, size, requires_grad=True)
    cond2 = None if cond is None else cond.repeat(2)
    logits = head(backbone.bottleneck(x, torch.tensor([5.0, 700.0]), cond2))
    assert logits.shape == (2,)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("size", [4, 8, 32, 6])
def test_head_reduces_any_map_to_one_logit(size):
    head = BottleneckHead(16, size)
    assert head(torch.randn(3, 16, size, size)).shape == (3,)


def test_bottleneck_skips_the_decoder():
    """The bottleneck equals the mid block's output of a full forward pass."""
    backbone, _ = _backbone("unet")
    seen = []
    handle = backbone.model.mid_block.register_forward_hook(lambda m, a, out: seen.append(out))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    backbone(x, t)
    handle.remove()
    torch.testing.assert_close(backbone.bottleneck(x, t), seen[0])


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_features_are_the_levels_outputs_of_a_full_forward_and_each_gets_a_head(kind):
    """``Backbone.features``: the mid and up blocks' outputs (UNet) or every block's tokens as maps (DiT), equal
    to what a full forward computes; ``LevelHeads`` gives one logit per level and passes gradients to x."""
    backbone, cond = _backbone(kind, 8)
    modules = backbone.feature_modules()
    expected = (1 + len(backbone.model.up_blocks)) if kind == "unet" else len(backbone.model.transformer_blocks)
    assert len(modules) == expected
    seen = []
    handles = [m.register_forward_hook(lambda m, a, out: seen.append(out)) for m in modules]
    x, t = torch.randn(2, 1, 8, 8, requires_grad=True), torch.tensor([1.0, 500.0])
    cond2 = None if cond is None else cond.repeat(2)
    backbone(x, t, cond2)
    for h in handles:
        h.remove()
    features = backbone.features(x, t, cond2)
    for f, out in zip(features, seen, strict=True):
        if kind == "dit":  # tokens (B, N, D) -> (B, D, h, w), patch 2 on an 8x8 input
            out = out.transpose(1, 2).reshape(2, out.shape[2], 4, 4)
        torch.testing.assert_close(f, out)
    heads = level_heads_for(backbone, (1, 8, 8), cond)
    logits = heads(features)
    assert logits.shape == (2, expected)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in heads.parameters())


@pytest.mark.parametrize("size, grid", [(4, 4), (8, 4), (16, 4), (6, 4), (16, 2), (5, 2)])
def test_patch_head_gives_a_grid_of_logits(size, grid):
    """``grid`` g > 1: g² logits per image from any map at least g wide, the convolutions' halvings stopping at g
    (then averaged to g where the side is not g·2^k); a map narrower than the grid is refused with the fix."""
    head = BottleneckHead(16, size, grid)
    assert head(torch.randn(3, 16, size, size)).shape == (3, grid * grid)
    halvings = sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in head.net)
    side = size
    for _ in range(halvings):
        side //= 2
    assert grid <= side < 2 * grid
    with pytest.raises(ValueError, match=f"choose gan_head_grid <= {grid - 1}"):
        BottleneckHead(16, grid - 1, grid)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_patch_level_heads_weigh_every_level_equally(kind):
    """``LevelHeads`` with grid 2: (B, L·4) logits, level after level; the mean loss over the columns is the
    mean over heads of each head's own mean over its cells, and every head gets a gradient."""
    backbone, cond = _backbone(kind, 8)
    heads = level_heads_for(backbone, (1, 8, 8), cond, grid=2)
    x = torch.randn(3, 1, 8, 8)
    cond3 = None if cond is None else cond.repeat(3)
    logits = heads(backbone.features(x, torch.tensor([3.0, 300.0, 900.0]), cond3))
    levels = len(heads.heads)
    assert logits.shape == (3, levels * 4)
    fake = logits.flip(0)
    per_head = [discriminator_loss(logits[:, 4 * i:4 * i + 4], fake[:, 4 * i:4 * i + 4], "hinge") for i in range(levels)]
    torch.testing.assert_close(discriminator_loss(logits, fake, "hinge"), torch.stack(per_head, -1).mean(-1))
    generator_loss(logits, "hinge").sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for h in heads.heads for p in h.net[-1].parameters())
    with pytest.raises(ValueError, match="smallest feature level is 2x2; choose gan_head_grid <= 2"):
        LevelHeads([(8, 8), (8, 2), (8, 16)], grid=4)


def test_losses_match_their_closed_forms():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    torch.testing.assert_close(discriminator_loss(real, fake), F.softplus(fake) + F.softplus(-real))
    torch.testing.assert_close(generator_loss(fake), torch.log1p(torch.exp(-fake)))
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"), torch.tensor([1.5 + 0.0, 0.0 + 2.0]))
    torch.testing.assert_close(generator_loss(fake, "hinge"), -fake)
    # A perfect discriminator (real -> +inf, fake -> -inf) has zero loss; a confused one log 4.
    assert discriminator_loss(torch.tensor([50.0]), torch.tensor([-50.0])).item() < 1e-10
    torch.testing.assert_close(discriminator_loss(torch.zeros(1), torch.zeros(1)), torch.log(torch.tensor([4.0])))
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(fake, "wasserstein")


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    main = (3.0 * layer).sum()          # gradient (3, 3): norm 3*sqrt(2)
    adversarial = (layer**2).sum()      # gradient (2, 4): norm sqrt(20)
    expected = 3 * 2**0.5 / 20**0.5
    torch.testing.assert_close(adaptive_weight(main, adversarial, layer), torch.tensor(expected), rtol=1e-6, atol=0)
    assert adaptive_weight(main, 1e-9 * adversarial, layer).item() == 10.0   # clipped to CTM's upper bound
    (main + adversarial).backward()  # the graph was kept for the trainer
    torch.testing.assert_close(layer.grad, torch.tensor([5.0, 7.0]))


def test_approximate_r1_estimates_the_squared_input_gradient():
    """((D(x + std n) - D(x)) / std)² is (grad D · n)² for a linear D at any std, and its mean over n is
    ||grad D||² (exact R1, by autograd) for a smooth nonlinear D at a small std."""
    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, 4)
    linear = lambda x: (w * x).flatten(1).sum(1)  # noqa: E731
    x, n = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for std in (1e-2, 1.0):
        exact = (w * n).flatten(1).sum(1) ** 2
        torch.testing.assert_close(approximate_r1(linear, x, linear(x), n, std), exact, rtol=1e-3, atol=1e-4)

    def smooth(x):
        return torch.tanh((w * x).flatten(1).sum(1) / 4) + (x**2).flatten(1).mean(1)

    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth(x).sum(), x)
    many = x.detach().expand(20000, -1, -1, -1)
    noise = torch.randn(many.shape, dtype=torch.float64)
    estimate = approximate_r1(smooth, many, smooth(many), noise, 1e-4).mean()
    assert estimate.item() == pytest.approx(grad.square().sum().item(), rel=0.03)


def test_diffusion_discriminator_is_a_trainable_copy():
    backbone, _ = _backbone("dit")
    disc = DiffusionDiscriminator(backbone, (1, 8, 8), Cond(labels=torch.tensor([0])))
    assert all(p.requires_grad for p in disc.parameters())
    assert disc.backbone is not backbone
    logits = disc(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 4.0]), Cond(labels=torch.tensor([1, 2])))
    assert logits.shape == (2,)
    assert output_layer(backbone) is backbone.model.proj_out_2.weight


def test_probe_condition_needs_no_null_class():
    """Sizing a head or discriminator must work for class teachers trained without a null class (CAF's and
    CTM's EDM CIFAR-10 setting): the probe is class 0, never the null condition."""
    from types import SimpleNamespace

    from fewstep.gan import probe_cond

    def no_null(n):
        raise AssertionError("probe_cond asked a class teacher for its null condition")

    plain = SimpleNamespace(image_channels=0)
    class_teacher = SimpleNamespace(conditioning="class", device=torch.device("cpu"), null_cond=no_null, net=plain)
    assert probe_cond(class_teacher).labels.tolist() == [0]
    assert probe_cond(SimpleNamespace(conditioning="none", device=torch.device("cpu"), net=plain)) is None
