"""Recipes: named sets of training defaults, one per architecture family, measured in docs/benchmarks.md.

Precedence (lowest first): :class:`train.config.TrainConfig`'s field defaults (= the ``paper`` recipe,
Ganin et al. 2016: SGD 0.01 with the paper's schedules) < the recipe < a ``--config`` file < flags.
``--recipe auto`` (the default) picks by architecture family: the ``--arch`` given, or else the one
``--arch auto`` would choose for the datasets (USPS → lenet, folders → resnet50, otherwise a digit CNN).

=========  ===============================================  ====================================================
recipe     for                                              what it sets
=========  ===============================================  ====================================================
paper      anything                                         nothing: the paper's SGD recipe, exactly the old default
digits     28/32-px colour digits (MNIST, MNIST-M, SVHN,    fungtion/DANN's BN CNN at 28 px, Adam 1e-3, BN per
           the demo pair): dann_mnist*, dann_svhn           domain, G_d with BN, batch 128 — plus a cosine lr decay
                                                            over the last 25 % of steps, EMA weights and each
                                                            image normalised on its own (``input_norm: instance``)
lenet      USPS pairs: lenet, lenet_bn                      TLlib's digit setting: LeNet, batch 128, SGD μ0 0.1
                                                            (the paper's schedules) — plus EMA weights, 5,000
                                                            steps, self-training from half-way (not for
                                                            ``--method source-only``) and geometric
                                                            augmentation (±10°, zoom ×1.4, shift 10 %: USPS
                                                            digits fill their frame, MNIST's do not)
resnet     image folders: resnet18, resnet50                the paper's layered-lr SGD (backbone lr × 0.1) at
                                                            batch 32 — plus EMA weights
=========  ===============================================  ====================================================
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    "paper": {},
    "digits": {"arch": "dann_mnist_bn28", "optimizer": "adam", "lr": 0.001, "lr_schedule": False,
               "weight_decay": 0.0, "batch_size": 128, "bn_per_domain": True, "disc_bn": True,
               "lr_decay_tail": 0.25, "ema": 0.999, "input_norm": "instance"},
    "lenet": {"arch": "lenet", "batch_size": 128, "lr": 0.1, "ema": 0.999, "steps": 5000, "pseudo_weight": 1.0,
              "aug_rotate": 10.0, "aug_scale": 0.4, "aug_shift": 0.1},
    "resnet": {"arch": "resnet50", "batch_size": 32, "ema": 0.999},
}
FAMILY = {"dann_mnist": "digits", "dann_mnist_bn": "digits", "dann_mnist_bn28": "digits", "dann_svhn": "digits",
          "lenet": "lenet", "lenet_bn": "lenet", "resnet18": "resnet", "resnet50": "resnet"}
NAMES = ("auto", *RECIPES)


COLOUR = ("mnist_m", "svhn", "syn", "demo-target")


def auto_arch(source: str | list[str], target: str) -> str:
    """The architecture ``--arch auto`` means for these datasets (one source or several) under the paper
    recipe: USPS → lenet (grey 28 px; with several sources when none is in colour or when USPS is the
    target — colour sources are then seen as grey: → USPS combined DANN 95.5 % with it, 69.5 % with the
    colour CNN, docs/benchmarks.md §11), folders → resnet50, else a colour digit CNN."""
    kinds = [s.split(":")[0] for s in ([source] if isinstance(source, str) else source) + [target]]
    if "usps" in kinds and (len(kinds) == 2 or kinds[-1] == "usps" or not set(kinds) & set(COLOUR)):
        return "lenet"
    if "folder" in kinds:
        return "resnet50"
    return "dann_mnist"


def resolve(name: str, arch: str, source: str | list[str], target: str, method: str = "dann"
            ) -> tuple[str, dict]:
    """(recipe name, its option values) for ``--recipe name`` with ``--arch arch`` on these datasets.

    For ``--method source-only`` a recipe's self-training is left out: it learns from target images, and
    the source-only baseline must not see any (``--pseudo-weight`` given explicitly still holds)."""
    if name not in NAMES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(NAMES)}")
    if name == "auto":
        family_arch = arch if arch and arch != "auto" else auto_arch(source, target)
        name = FAMILY.get(family_arch, "paper")
    values = dict(RECIPES[name])
    if method == "source-only":
        values.pop("pseudo_weight", None)
    return name, values
