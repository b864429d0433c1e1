"""The condition-image seam: Cond.image through Cond's operations, the backbone's image channels, scalar defaults,
the teacher's image condition (fewstep.imagecond) and the trainer filling it from the data."""

import json

import pytest
import torch

from fewstep.backbones import Backbone
from fewstep.imagecond import ImageCondition
from fewstep.teacher import load_teacher, save_teacher
from fewstep.testing import make_tiny_teacher, run_tiny, tiny_dit, tiny_run_config, tiny_unet
from fewstep.types import Cond


def _cond(n: int = 4) -> Cond:
    return Cond(labels=torch.arange(n), image=torch.randn(n, 1, 8, 8))


def test_cond_image_survives_index_repeat_cat_where_and_to():
    c = _cond()
    assert torch.equal(c.index(torch.tensor([2, 0])).image, c.image[[2, 0]])
    assert torch.equal(c.index(slice(1, 3)).image, c.image[1:3])
    assert torch.equal(c.repeat(2).image, c.image.repeat_interleave(2, 0))
    assert torch.equal(Cond.cat([c, c.index(slice(0, 1))]).image, torch.cat([c.image, c.image[:1]]))
    other = _cond()
    mask = torch.tensor([True, False, True, False])
    mixed = c.where(mask, other)
    assert torch.equal(mixed.image[0], other.image[0]) and torch.equal(mixed.image[1], c.image[1])
    # a null condition (labels only) drops the labels and keeps the image
    null = Cond(labels=torch.full((4,), 10))
    dropped = c.where(mask, null)
    assert torch.equal(dropped.image, c.image) and dropped.labels.tolist() == [10, 1, 10, 3]
    assert c.to("cpu", torch.float64).image.dtype == torch.float64 and not c.is_empty
    assert Cond(image=c.image).with_image(None).is_empty
    with pytest.raises(ValueError, match="Cond.with_image"):
        Cond.cat([c, null])


def test_the_condition_image_reaches_the_extra_channels_exactly():
    """[x, Cond.image, extra_input] along channels; at initialisation the widened network is the plain one."""
    torch.manual_seed(0)
    plain = Backbone(tiny_unet(num_classes=10), num_classes=10)
    net = Backbone(tiny_unet(num_classes=10), num_classes=10)
    net.load_state_dict(plain.state_dict())
    net.enable_self_conditioning()
    net.add_image_channels(2)  # inserted before the self-conditioning channels
    assert (net.in_channels, net.image_channels, net.extra_channels) == (1, 2, 3)
    seen = {}
    net.model.conv_in.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 10.0, 900.0])
    image, est = torch.randn(3, 2, 8, 8), torch.randn(3, 1, 8, 8)
    cond = Cond(labels=torch.tensor([0, 4, 9]), image=image)
    with torch.no_grad():
        out = net(x, t, cond, extra_input=est)
        ref = plain(x, t, Cond(labels=cond.labels))
    assert torch.equal(seen["x"], torch.cat([x, image, est], 1))
    assert torch.allclose(out, ref, atol=1e-6)
    with torch.no_grad():  # trained channels: the image changes the output
        net.model.conv_in.weight[:, 1:3].normal_()
        assert not torch.allclose(net(x, t, cond), net(x, t, cond.with_image(torch.zeros_like(image))))


def test_image_channels_on_a_dit():
    net = Backbone(tiny_dit())
    before = net.model.pos_embed.proj.weight.detach().clone()
    net.add_image_channels(1)
    x, t, labels = torch.randn(2, net.in_channels, 8, 8), torch.tensor([5.0, 50.0]), torch.tensor([1, 2])
    with torch.no_grad():
        out = net(x, t, Cond(labels=labels, image=torch.randn(2, 1, 8, 8)))
    assert out.shape == x.shape
    assert torch.equal(net.model.pos_embed.proj.weight[:, : before.shape[1]], before)


def test_missing_or_unexpected_condition_images_are_refused():
    net = Backbone(tiny_unet())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="reads no condition image"):
        net(x, t, Cond(image=torch.zeros(2, 1, 8, 8)))
    net.add_image_channels(1)
    with pytest.raises(ValueError, match="image-conditioned.*Cond has none"):
        net(x, t, None)
    with pytest.raises(ValueError, match=r"Cond.image has shape \(2, 1, 4, 4\)"):
        net(x, t, Cond(image=torch.zeros(2, 1, 4, 4)))
    with pytest.raises(ValueError, match="no extra input channels besides"):
        net(x, t, Cond(image=torch.zeros(2, 1, 8, 8)), extra_input=torch.zeros(2, 1, 8, 8))


def test_scalar_default_is_the_value_of_a_left_out_scalar_and_round_trips(tmp_path):
    net = Backbone(tiny_unet())
    net.add_image_channels(1)
    net.add_scalar_inputs(["stage"])
    with torch.no_grad():
        for p in net.scalar_embeddings["stage"].parameters():
            p.normal_()
    net.set_scalar_default("stage", 500.0)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 30.0]), Cond(image=torch.randn(2, 1, 8, 8))
    with torch.no_grad():
        assert torch.equal(net(x, t, cond), net(x, t, cond, stage=torch.full((2,), 500.0)))
        assert not torch.allclose(net(x, t, cond), net(x, t, cond, stage=torch.zeros(2)))
    with pytest.raises(ValueError, match="not an embedded scalar"):
        net.set_scalar_default("s", 1.0)
    net.save_pretrained(tmp_path / "net")
    back = Backbone.from_pretrained(tmp_path / "net")
    assert (back.image_channels, back.scalar_defaults, back.in_channels) == (1, {"stage": 500.0}, 1)
    rebuilt = Backbone.from_config_dict(net.config_dict())
    assert (rebuilt.image_channels, rebuilt.scalar_defaults) == (1, {"stage": 500.0})
    with torch.no_grad():
        assert torch.equal(back(x, t, cond), net(x, t, cond))


def test_lowres_image_condition_closed_form():
    x0 = torch.randn(2, 1, 8, 8)
    z = torch.randn(2, 1, 8, 8)
    c = ImageCondition("lowres", size=4, upsampling="nearest", noise=0.1)
    blocks = x0.reshape(2, 1, 4, 2, 4, 2).mean((3, 5)).repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert torch.allclose(c.make(x0, z), blocks + 0.1 * z, atol=1e-6)
    assert ImageCondition.from_config(c.config()) == c
    cond, uncond = c.attach(x0, Cond(labels=torch.tensor([1, 2])), Cond(labels=torch.tensor([10, 10])), z)
    assert torch.equal(cond.image, uncond.image) and torch.equal(cond.labels, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="not a multiple"):
        ImageCondition("lowres", size=3).make(x0, z)
    with pytest.raises(ValueError, match="unknown"):
        ImageCondition(kind="blur")
    with pytest.raises(ValueError, match="unknown keys"):
        ImageCondition.from_config({"kind": "lowres", "sigma": 1})
    with pytest.raises(ValueError, match="has none"):
        c.attach(None, Cond(), None, z)


@pytest.fixture(scope="module")
def sr_teacher(tmp_path_factory):
    """A class-conditional 8x8 'super-resolution' teacher: a tiny teacher with a 1-channel condition image made by
    block-averaging to 4x4."""
    plain = make_tiny_teacher(tmp_path_factory.mktemp("plain"), "unet", conditioning="class")
    t = load_teacher(plain)
    net = t.net
    net.add_image_channels(1)
    with torch.no_grad():
        net.model.conv_in.weight[:, 1:2].normal_(std=0.3)
    folder = tmp_path_factory.mktemp("sr")
    save_teacher(folder, net, t.process, image_condition=ImageCondition("lowres", 4, "nearest", 0.05))
    return folder


def test_image_conditioned_teacher_round_trips_and_guides_with_its_image(sr_teacher):
    teacher = load_teacher(sr_teacher)
    assert teacher.image_condition == ImageCondition("lowres", 4, "nearest", 0.05)
    assert teacher.sample_shape == (1, 8, 8) and teacher.net.image_channels == 1
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    cond = Cond(labels=torch.tensor([1, 2]), image=torch.randn(2, 1, 8, 8))
    guided = teacher.denoise(x, sigma, cond, guidance=2.0)  # the null condition gets the same image
    c = teacher.denoise(x, sigma, cond)
    u = teacher.denoise(x, sigma, Cond(labels=torch.full((2,), 10), image=cond.image))
    assert torch.allclose(guided, u + 2.0 * (c - u), atol=1e-5)
    with pytest.raises(ValueError, match="image-conditioned.*Cond has none"):
        teacher.denoise(x, sigma, Cond(labels=cond.labels))
    with pytest.raises(ValueError, match="needs an image_condition"):
        save_teacher(sr_teacher.parent / "bad", teacher.net, teacher.process)


def _set_up(config, run_dir):
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    trainer = Trainer(config, build_manager(config.method.name), run_dir)
    trainer.setup()
    return trainer


def test_trainer_fills_the_condition_image_and_cd_distils_an_image_conditioned_teacher(sr_teacher, tmp_path):
    """The batch's cond and uncond carry the transform of the batch's images (a pure function of seed and images
    seen); cd's student starts as its teacher, both read the image, and a short run trains and exports it."""
    config = tiny_run_config(sr_teacher, {"name": "cd"}, steps=2, batch=4, data={"resolution": 8})
    trainer = _set_up(config, tmp_path / "setup")
    batch = trainer.batch(0)
    clean = ImageCondition("lowres", 4).make(batch.x0, torch.zeros_like(batch.x0))
    assert batch.cond.image.shape == (4, 1, 8, 8) and torch.equal(batch.uncond.image, batch.cond.image)
    assert 0 < (batch.cond.image - clean).abs().max() < 0.05 * 6  # the augmentation noise, std 0.05
    assert torch.equal(trainer.batch(0).cond.image, batch.cond.image)
    noise, vcond = trainer.validation_inputs()
    assert vcond.image.shape == (noise.shape[0], 1, 8, 8) and vcond.labels is not None
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 300.0)  # below the default cap (t = 395 on linear betas)
    teacher, student = trainer.nets.teacher.net, trainer.nets.student
    with torch.no_grad():
        assert torch.equal(student(x, t, batch.cond), teacher(x, t, batch.cond))
        assert not torch.allclose(teacher(x, t, batch.cond), teacher(x, t, batch.cond.with_image(clean * 0)))
    run_tiny(config, tmp_path / "cd")
    exported = Backbone.from_pretrained(tmp_path / "cd" / "export" / "unet")
    assert exported.image_channels == 1
    with torch.no_grad():
        assert not torch.allclose(exported(x, t, batch.cond), teacher(x, t, batch.cond))  # it trained


def test_a_teacher_without_its_image_condition_gets_a_clear_error(sr_teacher, tmp_path):
    meta = sr_teacher / "fewstep_teacher.json"
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(sr_teacher, broken)
    (broken / "fewstep_teacher.json").write_text(json.dumps({"num_classes": json.loads(meta.read_text())["num_classes"]}))
    with pytest.raises(ValueError, match="declares no image_condition"):
        run_tiny(tiny_run_config(broken, {"name": "cd"}, steps=1, batch=4, data={"resolution": 8}), tmp_path / "run")


@pytest.mark.parametrize("method", [{"name": "dmd2"}, {"name": "ctm", "gan_start_nimg": 4}])
def test_distribution_and_trajectory_methods_distil_an_image_conditioned_teacher_unchanged(method, sr_teacher,
                                                                                             tmp_path):
    """dmd2 (fake score + GAN head on its bottleneck) and ctm ((t, s) student, GAN from its second step) run on the
    image-conditioned teacher: their networks are sized with a probe condition that carries an image."""
    _, recorder = run_tiny(tiny_run_config(sr_teacher, method, steps=2, batch=4, data={"resolution": 8}),
                           tmp_path / method["name"])
    losses = {k: v for log in recorder.logs for k, v in log.items() if k.endswith("/loss")}
    assert losses and all(torch.isfinite(torch.tensor(list(losses.values()))))
    if method["name"] == "ctm":
        assert "disc/loss" in losses  # the discriminator trained on conditions with images
