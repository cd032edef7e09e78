"""Shapes and structure of every architecture."""

import pytest
import torch

from train.models import ARCH_INPUT, build_model
from train.loop import param_groups
from train.config import TrainConfig

DIGIT_ARCHS = ["dann_mnist", "dann_mnist_bn", "dann_mnist_bn28", "dann_svhn", "lenet"]


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
