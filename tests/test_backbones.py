import copy

import pytest
import torch

from fewstep.backbones import Backbone, enable_gradient_checkpointing
from fewstep.testing import tiny_dit, tiny_unet, tiny_unet_condition
from fewstep.types import Cond

B = 3


def _build(kind: str) -> Backbone:
    torch.manual_seed(0)
    if kind == "unet":
        return Backbone(tiny_unet())
    if kind == "unet_class":
        return Backbone(tiny_unet(num_classes=10), num_classes=10)
    if kind == "unet_condition":
        return Backbone(tiny_unet_condition())
    if kind == "dit":
        return Backbone(tiny_dit())
    return Backbone(tiny_dit(learned_sigma=True))


def _inputs(kind: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, Cond | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    if kind in ("unet_class", "dit", "dit_sigma"):
        cond = Cond(labels=torch.tensor([0, 3, 10]))
    elif kind == "unet_condition":
        cond = Cond(embeddings=torch.randn(B, 5, 32, generator=g))
    else:
        cond = None
    return x, t, cond


def _perturb_zero_layers(net: Backbone) -> None:
    with torch.no_grad():
        for emb in net.scalar_embeddings.values():
            emb.mlp.linear_2.weight.normal_(0, 0.5)
            emb.mlp.linear_2.bias.normal_(0, 0.5)


KINDS = ["unet", "unet_class", "unet_condition", "dit", "dit_sigma"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_shape_and_metadata(kind):
    net = _build(kind)
    x, t, cond = _inputs(kind)
    out = net(x, t, cond)
    assert out.shape == (B, 1, 8, 8) and torch.isfinite(out).all()
    assert (net.in_channels, net.out_channels, net.sample_size) == (1, 1, 8)
    expected = {
        "unet": "none",
        "unet_class": "class",
        "unet_condition": "text",
        "dit": "class",
        "dit_sigma": "class",
    }
    assert net.conditioning == expected[kind]
    if net.conditioning == "class":
        assert net.num_classes == 10 and net.has_null_class


def test_dit_learned_sigma_keeps_mean_half():
    net = _build("dit_sigma")
    x, t, cond = _inputs("dit_sigma")
    full = net.model(x, t, class_labels=cond.labels).sample
    assert full.shape[1] == 2
    torch.testing.assert_close(net(x, t, cond), full[:, :1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["unet_class", "unet_condition", "dit"])
def test_conditioning_changes_output(kind):
    net = _build(kind)
    x, t, cond = _inputs(kind)
    if kind == "unet_condition":
        other = Cond(embeddings=cond.embeddings + 1.0)
    else:
        other = Cond(labels=(cond.labels + 1) % 11)
    assert (net(x, t, cond) - net(x, t, other)).abs().max() > 1e-4


def test_missing_conditioning_is_an_error():
    with pytest.raises(ValueError, match="embeddings"):
        _build("unet_condition")(*_inputs("unet")[:2])
    with pytest.raises(ValueError, match="class-conditional"):
        _build("dit")(*_inputs("unet")[:2])


def test_dit_never_drops_labels_in_training_mode():
    net = _build("dit").train()
    x, t, cond = _inputs("dit")
    torch.manual_seed(0)
    a = net(x, t, cond)
    b = net.eval()(x, t, cond)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["unet", "unet_condition", "dit", "dit_sigma"])
def test_scalar_inputs_start_at_teacher_and_learn(kind):
    net = _build(kind)
    x, t, cond = _inputs(kind)
    before = net(x, t, cond)
    net.add_scalar_inputs(["s", "w"])
    assert net.extra_scalars == ("s", "w")
    s, w = torch.tensor([1.0, 50.0, 700.0]), torch.tensor([1.5, 3.0, 7.0])
    torch.testing.assert_close(net(x, t, cond, s=s, w=w), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(net(x, t, cond), before, rtol=0, atol=1e-6)

    # Gradients reach the extra embedding (only the zero layer gets a non-zero gradient at init).
    net(x, t, cond, s=s, w=w).square().mean().backward()
    for emb in net.scalar_embeddings.values():
        assert emb.mlp.linear_2.weight.grad.abs().sum() > 0

    _perturb_zero_layers(net)
    with torch.no_grad():
        a = net(x, t, cond, s=s, w=w)
        b = net(x, t, cond, s=s + 100.0, w=w)
    assert (a - before).abs().max() > 1e-4
    assert (a - b).abs().max() > 1e-4


def test_unet_condition_takes_w_as_diffusers_timestep_cond(tmp_path):
    """SD / SDXL UNets read w natively: a zero-initialised time_embedding.cond_proj and time_cond_proj_dim in the
    config; timestep_cond is StableDiffusionPipeline's embedding of guidance_scale - 1 (fewstep feeds w * 100);
    save_pretrained / from_pretrained keep it; moving it to a fewstep embedding (LoRA students) keeps the output."""
    from diffusers import StableDiffusionPipeline

    from fewstep.backbones import GUIDANCE_COND_DIM, guidance_inputs, guidance_scale_embedding

    net = _build("unet_condition")
    x, t, cond = _inputs("unet_condition")
    before = net(x, t, cond)
    net.add_scalar_inputs(["w"])
    w = torch.tensor([1.5, 3.0, 7.0])
    assert net.native_guidance and not len(net.scalar_embeddings)
    assert net.model.config.time_cond_proj_dim == GUIDANCE_COND_DIM
    torch.testing.assert_close(net(x, t, cond, **guidance_inputs(w)), before, rtol=0, atol=0)
    torch.testing.assert_close(guidance_scale_embedding(w - 1, GUIDANCE_COND_DIM),
                               StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, GUIDANCE_COND_DIM),
                               rtol=0, atol=0)
    with torch.no_grad():
        net.model.time_embedding.cond_proj.weight.normal_(0, 0.5)
        direct = net.model(x, t, encoder_hidden_states=cond.embeddings,
                           timestep_cond=guidance_scale_embedding(w - 1, GUIDANCE_COND_DIM)).sample
        ours = net(x, t, cond, **guidance_inputs(w))
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-6)
    assert (ours - before).abs().max() > 1e-4
    net.save_pretrained(tmp_path)
    assert not (tmp_path / "fewstep_extra.safetensors").exists()
    twin = Backbone.from_pretrained(tmp_path)
    assert twin.native_guidance and twin.extra_scalars == ("w",)
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, cond, **guidance_inputs(w)), ours, rtol=0, atol=0)

    with pytest.raises(ValueError, match="already trained"):
        net.embed_guidance_as_scalar()
    fresh = _build("unet_condition")
    fresh.add_scalar_inputs(["w"])
    fresh.embed_guidance_as_scalar()
    assert not fresh.native_guidance and list(fresh.scalar_embeddings) == ["w"]
    assert fresh.model.config.time_cond_proj_dim is None and fresh.model.time_embedding.cond_proj is None
    torch.testing.assert_close(fresh(x, t, cond, **guidance_inputs(w)), before, rtol=0, atol=0)


def test_dit_scalars_condition_final_layer_and_every_block():
    net = _build("dit")
    net.add_scalar_inputs(["s"])
    _perturb_zero_layers(net)
    calls = []
    for block in net.model.transformer_blocks:
        block.norm1.emb.register_forward_hook(lambda m, a, o: calls.append(o.detach()))
    x, t, cond = _inputs("dit")
    net(x, t, cond, s=torch.ones(B))
    # 2 blocks + the final proj_out conditioning, which re-runs block 0's embedder.
    assert len(calls) == 3
    seen = list(calls)
    extra = net.scalar_embeddings["s"](torch.ones(B))
    blocks = net.model.transformer_blocks
    for out, block in zip(seen, [blocks[0], blocks[1], blocks[0]]):
        plain = block.norm1.emb(t, cond.labels, hidden_dtype=torch.float32)  # outside forward: no extra
        torch.testing.assert_close(out, plain + extra)


def test_unknown_scalar_is_an_error():
    net = _build("unet")
    net.add_scalar_inputs(["s"])
    x, t, _ = _inputs("unet")
    with pytest.raises(ValueError, match=r"'w'.*\['s'\]"):
        net(x, t, w=torch.ones(B))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_deepcopy_is_independent(kind):
    net = _build(kind)
    net.add_scalar_inputs(["s"])
    twin = copy.deepcopy(net)
    x, t, cond = _inputs(kind)
    s = torch.full((B,), 3.0)
    ref = net(x, t, cond, s=s)
    _perturb_zero_layers(twin)
    with torch.no_grad():
        assert (twin(x, t, cond, s=s) - ref).abs().max() > 1e-4
        # The original's hooks still use the original's (zero) embedding.
        torch.testing.assert_close(net(x, t, cond, s=s), ref, rtol=0, atol=0)
        # And the copy's hooks use the copy's embedding: re-zeroing it restores the teacher output.
        for emb in twin.scalar_embeddings.values():
            emb.mlp.linear_2.weight.zero_()
            emb.mlp.linear_2.bias.zero_()
        torch.testing.assert_close(twin(x, t, cond, s=s), ref, rtol=0, atol=1e-6)


def test_state_dict_round_trip_through_config_dict():
    net = _build("unet_condition")
    net.add_scalar_inputs(["w"])
    _perturb_zero_layers(net)
    cfg = net.config_dict()
    assert cfg["extra_scalars"] == ["w"] and cfg["model_class"] == "UNet2DConditionModel"
    twin = Backbone.from_config_dict(cfg)
    twin.load_state_dict(net.state_dict())
    x, t, cond = _inputs("unet_condition")
    w = torch.full((B,), 4.0)
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, cond, w=w), net(x, t, cond, w=w), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extra", [False, True])
def test_save_pretrained_round_trip(kind, extra, tmp_path):
    net = _build(kind)
    if extra:
        net.add_scalar_inputs(["s"])
        _perturb_zero_layers(net)
    net.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "fewstep_extra.safetensors").exists() == extra
    twin = Backbone.from_pretrained(tmp_path)
    assert (twin.kind, twin.num_classes, twin.extra_scalars) == (net.kind, net.num_classes, net.extra_scalars)
    x, t, cond = _inputs(kind)
    scalars = {"s": torch.full((B,), 2.0)} if extra else {}
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, cond, **scalars), net(x, t, cond, **scalars), rtol=0, atol=0)


def test_plain_diffusers_folder_loads_and_unsupported_class_errors(tmp_path):
    torch.manual_seed(0)
    model = tiny_unet(num_classes=10)
    model.save_pretrained(tmp_path / "plain")
    net = Backbone.from_pretrained(tmp_path / "plain", num_classes=10)
    assert net.num_classes == 10 and net.has_null_class
    assert Backbone.from_pretrained(tmp_path / "plain").num_classes == 11  # no metadata: no null slot assumed

    from diffusers import AutoencoderKL

    with pytest.raises(ValueError, match="UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel"):
        Backbone(AutoencoderKL(block_out_channels=(8,), norm_num_groups=8))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="AutoencoderKL"):
        Backbone.from_pretrained(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Backbone.from_pretrained(tmp_path / "nothing")


def test_dit_gradient_checkpointing_uses_each_forwards_scalars():
    """Checkpointed DiT blocks re-run their embedders during backward, after a second forward."""
    net = _build("dit")
    net.add_scalar_inputs(["s"])
    _perturb_zero_layers(net)
    x, t, cond = _inputs("dit")
    s1, s2 = torch.full((B,), 1.0), torch.full((B,), 900.0)

    def grads(model: Backbone) -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(x, t, cond, s=s1).square().mean() + 0.5 * model(x, t, cond, s=s2).abs().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    twin = copy.deepcopy(net).train()
    enable_gradient_checkpointing(twin)
    for a, b in zip(grads(net.train()), grads(twin)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_extra_input_channels_start_ignored_then_learn_and_round_trip(kind, tmp_path):
    net = _build(kind)
    x, t, cond = _inputs(kind)
    before = net(x, t, cond)
    net.add_input_channels(2)
    assert (net.in_channels, net.extra_channels, net.out_channels) == (1, 2, 1)
    extra = torch.randn(B, 2, 8, 8)
    torch.testing.assert_close(net(x, t, cond), before, rtol=0, atol=0)        # zeros when omitted
    torch.testing.assert_close(net(x, t, cond, extra_input=extra), before, rtol=0, atol=0)  # zero weights
    out = net(x, t, cond, extra_input=extra)
    out.square().mean().backward()
    conv = net.model.pos_embed.proj if kind.startswith("dit") else net.model.conv_in
    assert conv.weight.grad[:, 1:].abs().sum() > 0                            # the new channels learn
    with torch.no_grad():
        conv.weight[:, 1:].normal_()
    changed = net(x, t, cond, extra_input=extra)
    assert (changed - before).abs().max() > 1e-4
    net.save_pretrained(tmp_path / "net")
    loaded = Backbone.from_pretrained(tmp_path / "net")
    assert (loaded.in_channels, loaded.extra_channels) == (1, 2)
    torch.testing.assert_close(loaded(x, t, cond, extra_input=extra), changed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 2, 8, 8\)"):
        net(x, t, cond, extra_input=torch.randn(B, 1, 8, 8))
    with pytest.raises(ValueError, match="no extra input channels"):
        _build(kind)(x, t, cond, extra_input=extra)


@pytest.mark.parametrize("kind", ["unet", "unet_condition", "dit"])
def test_bottleneck_shapes(kind):
    net = _build(kind)
    x, t, cond = _inputs(kind)
    features = net.bottleneck(x, t, cond)
    channels = 16 if kind == "dit" else 32
    assert features.shape == (B, channels, 4, 4)
