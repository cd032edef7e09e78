"""Models: feature extractor G_f, label classifier G_y and domain discriminator G_d as separate modules.

``DANN.forward(x, coeff)`` runs all three in one call (so DDP sees every parameter)::

    f = G_f(normalize(x))            x: (N,H,W,C) uint8 → f: (N,D)
    logits = G_y(f)                  (N,K)
    d = G_d(GRL_coeff(f), softmax)   (N,)  logit of P(target domain)

With ``--method mdan`` and k sources the model also holds G_d^1..G_d^k (one per source, each behind the
GRL) and G_d itself sees *detached* features (it only learns, as in source-only runs: it is the drift
discriminator export ships); then d is (N, 1+k): column 0 G_d, column i G_d^i. :func:`shipped_domain_logit`
takes G_d's column either way.

Export keeps ``normalize → G_f → G_y`` (:meth:`DANN.inference_module`) and drops the GRL and G_d.

Architectures (``--arch``):

``--input-norm instance`` replaces the fixed normalisation by a per-image one (:class:`Normalize`), in
the exported graph too.

- ``dann_mnist``: the DANN paper's MNIST→MNIST-M CNN (conv 32 5×5 → pool → conv 48 5×5 → pool;
  G_y fc 100-100-K; G_d fc 100-1), input 32×32×3.
- ``dann_mnist_bn``: the same shape with BatchNorm and dropout and 64/50 channels (the
  fungtion/DANN variant users report ≈ 90 % with), input 32×32×3.
- ``dann_mnist_bn28``: ``dann_mnist_bn`` at fungtion/DANN's own input size, 28×28×3 (800 features),
  so its network and per-step work match that reference exactly (benchmarks/train_throughput.py).
- ``dann_svhn``: the paper's SVHN CNN (conv 64-64-128 5×5; G_y fc 3072-2048-K; G_d fc 1024-1024-1),
  input 32×32×3.
- ``lenet``: LeNet for MNIST↔USPS (conv 20-50 5×5, fc 500; G_d 500-500-1), input 28×28×1.
- ``lenet_bn``: TLlib's digit classifier — ``lenet`` + its ImageClassifier bottleneck (fc 256 with BN,
  ReLU) as the features; G_d 1024-1024-1, as in TLlib's digit scripts; input 28×28×1.
- ``resnet18`` / ``resnet50``: torchvision backbone (ImageNet normalisation) + bottleneck 256 with
  BN; G_d 1024-1024-1; input 224×224×3; backbone lr ×0.1; pretrained weights from a local file only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adaptserve.service.preprocess import InputSpec
from adaptserve.train.dann import grad_reverse

INPUT_NORMS = ("dataset", "instance")
DIGIT_MEAN, DIGIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 (N,H,W,C) → float (N,C,H,W), ``(x/255 − mean)/std``. Exported into the ONNX graph.

    ``instance=True`` (``--input-norm instance``, Shu et al. 2018): each image and channel to mean 0 and
    std 1 instead, ``(x − mean_hw(x)) / sqrt(var_hw(x) + 1e-5)`` on x/255 — brightness, contrast and colour
    cast are gone before G_f sees the image (a flat image becomes 0)."""

    def __init__(self, mean, std, instance: bool = False):
        super().__init__()
        self.instance = instance
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float().div(255.0)
        if self.instance:
            mu = x.mean((2, 3), keepdim=True)
            return (x - mu) / ((x - mu).pow(2).mean((2, 3), keepdim=True) + 1e-5).sqrt()
        return (x - self.mean) / self.std


class DomainDiscriminator(nn.Module):
    """G_d: features (N,D) [, class probabilities (N,K)] → domain logit (N,); P(target) = sigmoid.

    ``conditional=True`` is CDAN's input, the multilinear map f ⊗ p (flattened, D·K), replaced by the
    randomized map (R_f f) ⊙ (R_p p)/√r when D·K > 16384 (Long et al. 2018). Hidden layers are
    Linear-ReLU-Dropout(0.5) by default; ``bn=True`` makes them Linear-BatchNorm-ReLU as in fungtion/DANN
    and TLlib (with one concatenated batch BN can make the discriminator win too easily, a failure mode
    DANN users report; fungtion/DANN pairs it with per-domain batches).
    """

    def __init__(self, in_features: int, hidden: int, layers: int = 2, num_classes: int = 0,
                 conditional: bool = False, random_dim: int = 1024, bn: bool = False):
        super().__init__()
        self.conditional = conditional
        self.randomized = conditional and in_features * num_classes > 16384
        if self.randomized:
            self.register_buffer("rf", torch.randn(in_features, random_dim))
            self.register_buffer("rp", torch.randn(num_classes, random_dim))
            d_in = random_dim
        else:
            d_in = in_features * num_classes if conditional else in_features
        blocks, width = [], d_in
        for _ in range(layers - 1):
            blocks += ([nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)] if bn else
                       [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5)])
            width = hidden
        self.net = nn.Sequential(*blocks, nn.Linear(width, 1))

    def forward(self, f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            h = (f @ self.rf) * (p @ self.rp) / self.rf.shape[1] ** 0.5
        elif self.conditional:
            h = torch.bmm(p.unsqueeze(2), f.unsqueeze(1)).flatten(1)
        else:
            h = f
        return self.net(h).squeeze(1)


class DANN(nn.Module):
    """The whole adversarial network; see the module docstring for the data flow."""

    def __init__(self, normalize: Normalize, features: nn.Module, classifier: nn.Module,
                 discriminator: DomainDiscriminator, source_discriminators: list[DomainDiscriminator] = ()):
        super().__init__()
        self.normalize, self.features = normalize, features
        self.classifier, self.discriminator = classifier, discriminator
        self.source_discriminators = nn.ModuleList(source_discriminators)  # MDAN's G_d^i; empty otherwise

    def forward(self, x: torch.Tensor, coeff: float = 0.0, split: int | None = None):
        """``split=B``: each block of B rows (each source's, then the target's) goes through the network as
        its own batch, so in training every BatchNorm normalises each domain with its own statistics
        (fungtion/DANN's separate forward passes); outputs are concatenated back. ``None``: one batch."""
        if split is not None:
            parts = [self(part, coeff) for part in x.split(split)]
            return tuple(torch.cat(outs) for outs in zip(*parts))
        f = self.features(self.normalize(x))
        logits = self.classifier(f)
        p = logits.detach().softmax(1)
        if not len(self.source_discriminators):
            return logits, f, self.discriminator(grad_reverse(f, coeff), p)
        reversed_f = grad_reverse(f, coeff)
        d = [self.discriminator(grad_reverse(f, 0.0), p)] + [g(reversed_f, p) for g in self.source_discriminators]
        return logits, f, torch.stack(d, 1)

    def inference_module(self) -> nn.Module:
        """normalize → G_f → G_y, returning (logits, features): what export turns into ONNX."""
        return _Inference(self.normalize, self.features, self.classifier)


def shipped_domain_logit(d: torch.Tensor) -> torch.Tensor:
    """G_d's logit (N,) from ``DANN.forward``'s d: (N,) as it is, or column 0 of MDAN's (N, 1+k)."""
    return d if d.dim() == 1 else d[:, 0]


class _Inference(nn.Module):
    def __init__(self, normalize, features, classifier):
        super().__init__()
        self.normalize, self.features, self.classifier = normalize, features, classifier

    def forward(self, x):
        f = self.features(self.normalize(x))
        return self.classifier(f), f


@dataclass
class Arch:
    """What the trainer needs to know about an architecture beyond its modules."""

    name: str
    input_spec: InputSpec
    backbone_prefix: str = ""  # parameters under features.<prefix> get backbone_lr_mult


ARCH_INPUT = {
    "dann_mnist": InputSpec(32, 32, 3),
    "dann_mnist_bn": InputSpec(32, 32, 3),
    "dann_mnist_bn28": InputSpec(28, 28, 3),
    "dann_svhn": InputSpec(32, 32, 3),
    "lenet": InputSpec(28, 28, 1),
    "lenet_bn": InputSpec(28, 28, 1),
    "resnet18": InputSpec(224, 224, 3),
    "resnet50": InputSpec(224, 224, 3),
}


def _conv_features(spec: list, in_ch: int, size: int) -> tuple[nn.Sequential, int]:
    """Build ``[(out_ch, kernel, pool, bn, dropout), ...]`` conv blocks; return (module, flat dim)."""
    layers = []
    for out_ch, k, pool, bn, drop in spec:
        layers.append(nn.Conv2d(in_ch, out_ch, k))
        size = size - k + 1
        if bn:
            layers.append(nn.BatchNorm2d(out_ch))
        if drop:
            layers.append(nn.Dropout2d(drop))
        if pool:
            layers.append(nn.MaxPool2d(pool[0], pool[1], padding=pool[2]))
            size = (size + 2 * pool[2] - pool[0]) // pool[1] + 1
        layers.append(nn.ReLU(inplace=True))
        in_ch = out_ch
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), in_ch * size * size


def _mlp(dims: list[int], bn: bool = False, dropout: float = 0.0) -> nn.Sequential:
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers.append(nn.Linear(a, b))
        if bn:
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.ReLU(inplace=True))
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


def build_model(arch: str, num_classes: int, method: str = "dann", pretrained: str | None = None,
                disc_bn: bool = False, n_sources: int = 1, input_norm: str = "dataset") -> tuple[DANN, Arch]:
    """Build ``arch`` for ``num_classes``; ``method`` in cdan/cdan-e makes G_d conditional; ``disc_bn``
    puts BatchNorm in G_d's hidden layers; ``mdan`` adds one G_d^i per source (``n_sources`` of them);
    ``input_norm``: ``dataset`` (fixed mean/std) or ``instance`` (per image, :class:`Normalize`)."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input normalisation {input_norm!r}; choose from {', '.join(INPUT_NORMS)}")
    if arch not in ARCH_INPUT:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCH_INPUT)}")
    spec = ARCH_INPUT[arch]
    conditional = method in ("cdan", "cdan-e")
    backbone_prefix = ""
    if arch == "dann_mnist":
        features, dim = _conv_features([(32, 5, (2, 2, 0), False, 0), (48, 5, (2, 2, 0), False, 0)], 3, 32)
        classifier, (hidden, depth) = _mlp([dim, 100, 100, num_classes]), (100, 2)
    elif arch in ("dann_mnist_bn", "dann_mnist_bn28"):
        features, dim = _conv_features([(64, 5, (2, 2, 0), True, 0), (50, 5, (2, 2, 0), True, 0.5)], 3,
                                       spec.height)
        classifier, (hidden, depth) = _mlp([dim, 100, 100, num_classes], bn=True, dropout=0.5), (100, 2)
    elif arch == "dann_svhn":
        features, dim = _conv_features([(64, 5, (3, 2, 1), False, 0), (64, 5, (3, 2, 1), False, 0),
                                        (128, 5, None, False, 0)], 3, 32)
        classifier, (hidden, depth) = _mlp([dim, 3072, 2048, num_classes]), (1024, 3)
    elif arch in ("lenet", "lenet_bn"):
        conv, cdim = _conv_features([(20, 5, (2, 2, 0), False, 0), (50, 5, (2, 2, 0), False, 0.5)], 1, 28)
        layers, dim, hidden = [conv, nn.Linear(cdim, 500), nn.ReLU(inplace=True), nn.Dropout(0.5)], 500, 500
        if arch == "lenet_bn":  # TLlib's ImageClassifier bottleneck and DomainDiscriminator width
            layers, dim, hidden = layers + [nn.Linear(500, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True)], 256, 1024
        features = nn.Sequential(*layers)
        classifier, depth = nn.Linear(dim, num_classes), 3
    else:
        features, dim = _resnet(arch, pretrained)
        classifier, (hidden, depth) = nn.Linear(dim, num_classes), (1024, 3)
        backbone_prefix = "0."
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if arch.startswith("resnet") else (
        DIGIT_MEAN[: spec.channels], DIGIT_STD[: spec.channels])
    make_disc = lambda: DomainDiscriminator(dim, hidden, depth, num_classes, conditional, bn=disc_bn)  # noqa: E731
    disc = make_disc()
    per_source = [make_disc() for _ in range(n_sources)] if method == "mdan" else []
    return DANN(Normalize(mean, std, input_norm == "instance"), features, classifier, disc, per_source), Arch(arch, spec, backbone_prefix)


def _resnet(arch: str, pretrained: str | None) -> tuple[nn.Module, int]:
    """torchvision ResNet without its fc, + bottleneck Linear-BN-ReLU to 256. Weights from a local file."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if pretrained:
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [m for m in missing if not m.startswith("fc.")] or unexpected:
            raise ValueError(f"{pretrained} does not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    width = net.fc.in_features
    net.fc = nn.Identity()
    bottleneck = nn.Sequential(nn.Linear(width, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True))
    return nn.Sequential(net, bottleneck), 256
