"""Shapes and structure of every architecture."""

import pytest
import torch

from adaptserve.train.models import ARCH_INPUT, build_model
from adaptserve.train.loop import param_groups
from adaptserve.train.config import TrainConfig

DIGIT_ARCHS = ["dann_mnist", "dann_mnist_bn", "dann_mnist_bn28", "dann_svhn", "lenet", "lenet_bn"]


def test_every_architecture_has_a_recipe_family():  # the CLI's --arch choices and recipes come from FAMILY
    from adaptserve.train.recipes import FAMILY, RECIPES

    assert set(FAMILY) == set(ARCH_INPUT) and set(FAMILY.values()) <= set(RECIPES)


@pytest.mark.parametrize("arch", DIGIT_ARCHS + ["resnet18", "resnet50"])
@pytest.mark.parametrize("method", ["dann", "cdan-e"])
def test_forward_shapes(arch, method):
    torch.manual_seed(0)
    model, info = build_model(arch, num_classes=7, method=method)
    spec = ARCH_INPUT[arch]
    assert info.input_spec == spec
    n = 3
    x = torch.randint(0, 256, (n, spec.height, spec.width, spec.channels), dtype=torch.uint8)
    model.train()
    logits, f, d = model(x, coeff=1.0)
    assert logits.shape == (n, 7)
    assert f.ndim == 2 and f.shape[0] == n
    assert d.shape == (n,)
    model.eval()
    inf_logits, inf_f = model.inference_module()(x)
    assert inf_logits.shape == (n, 7) and inf_f.shape == f.shape
    assert not any("discriminator" in k for k in model.inference_module().state_dict())


def test_cdan_discriminator_is_conditional_and_randomized_when_wide():
    small, _ = build_model("dann_mnist", 10, "cdan")
    assert small.discriminator.conditional and not small.discriminator.randomized
    assert small.discriminator.net[0].in_features == 1200 * 10
    wide, _ = build_model("resnet18", 100, "cdan")  # 256 × 100 > 16384
    assert wide.discriminator.randomized and wide.discriminator.net[0].in_features == 1024


def test_resnet_backbone_gets_lower_learning_rate():
    model, arch = build_model("resnet18", 5, "dann")
    groups = param_groups(model, arch, TrainConfig(backbone_lr_mult=0.1))
    assert [g["lr_mult"] for g in groups] == [0.1, 1.0]
    backbone_ids = {id(p) for p in groups[0]["params"]}
    assert id(model.features[0].conv1.weight) in backbone_ids
    assert id(model.features[1][0].weight) not in backbone_ids  # bottleneck at full lr
    assert id(model.classifier.weight) not in backbone_ids


def test_resnet_pretrained_weights_from_local_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model, _ = build_model("resnet18", 4, "dann", pretrained=str(path))
    assert torch.equal(model.features[0].conv1.weight, ref.conv1.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"nonsense.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not match"):
        build_model("resnet18", 4, "dann", pretrained=str(bad))


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg99", 10)


def test_bn_per_domain_normalises_each_domain_with_its_own_batch_statistics():
    """split=B: the first BatchNorm sees source and target as two batches (fungtion/DANN), so each half
    of its output has per-channel mean ≈ 0; with one concatenated batch the two halves are pulled apart."""
    torch.manual_seed(0)
    model, _ = build_model("dann_mnist_bn28", 10, "dann")
    model.train()
    bn = model.features[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    seen = []
    bn.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    B = 16
    dark = torch.randint(0, 60, (B, 28, 28, 3), dtype=torch.uint8)
    bright = torch.randint(180, 256, (B, 28, 28, 3), dtype=torch.uint8)
    x = torch.cat([dark, bright])

    logits, f, d = model(x, 1.0, split=B)
    assert logits.shape == (2 * B, 10) and d.shape == (2 * B,) and f.shape[0] == 2 * B
    assert len(seen) == 2
    for half in seen:
        assert half.mean(dim=(0, 2, 3)).abs().max() < 1e-4

    seen.clear()
    model(x, 1.0)
    (joint,) = seen
    source_means = joint[:B].mean(dim=(0, 2, 3))
    assert source_means.abs().max() > 0.3


def test_discriminator_batchnorm_option():
    plain, _ = build_model("dann_mnist_bn28", 10, "dann")
    with_bn, _ = build_model("dann_mnist_bn28", 10, "dann", disc_bn=True)
    kinds = lambda m: [type(layer).__name__ for layer in m.discriminator.net]  # noqa: E731
    assert kinds(plain) == ["Linear", "ReLU", "Dropout", "Linear"]
    assert kinds(with_bn) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_optimizer_choice_is_validated():
    assert TrainConfig(optimizer="adam").validate().optimizer == "adam"
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        TrainConfig(optimizer="rmsprop").validate()


def test_every_training_option_has_cli_help():
    from dataclasses import fields

    from adaptserve.train.config import field_help

    helps = field_help()
    assert helps["bn_per_domain"].startswith("source and target through BatchNorm")
    assert [f.name for f in fields(TrainConfig) if not helps.get(f.name)] == []


def test_instance_norm_ignores_brightness_and_contrast_the_fixed_norm_does_not():
    """--input-norm instance (the digits recipe's default): x → a + c·x per image leaves G_f's input
    unchanged up to uint8 rounding, while the fixed (x/255 − 0.5)/0.5 moves with it."""
    from adaptserve.train.models import Normalize
    g = torch.Generator().manual_seed(0)
    x = torch.randint(40, 180, (4, 28, 28, 3), generator=g).float()
    changed = (30 + 0.6 * x).round().to(torch.uint8)  # brighter and lower contrast, no clipping
    inst, fixed = Normalize([0.5] * 3, [0.5] * 3, instance=True), Normalize([0.5] * 3, [0.5] * 3)
    assert (inst(changed) - inst(x.to(torch.uint8))).abs().max() < 0.03
    assert (fixed(changed) - fixed(x.to(torch.uint8))).abs().max() > 0.2
    from adaptserve.train.recipes import resolve
    assert resolve("auto", "auto", "mnist", "mnist_m")[1]["input_norm"] == "instance"
    assert "input_norm" not in resolve("auto", "auto", "usps", "mnist")[1]  # lenet: not measured with it
