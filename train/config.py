"""Training configuration: defaults < YAML file (``--config``) < command-line flags.

The resolved config is written to ``RUN_DIR/config.yaml``; ``--resume RUN_DIR`` reads it back.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

METHODS = ("source-only", "dann", "cdan", "cdan-e")


@dataclass
class TrainConfig:
    source: str = "demo-source"      # labelled source dataset spec
    target: str = "demo-target"      # unlabelled target dataset spec (labels, if any, are only used to report)
    eval: str | None = None          # dataset for target accuracy; default: the target's test split (or training part)
    method: str = "dann"             # source-only | dann | cdan | cdan-e
    arch: str = "auto"               # auto: lenet if USPS is involved, resnet50 for folders, else dann_mnist
    pretrained: str | None = None    # local .pth state dict for resnet backbones (never downloaded)
    steps: int = 2000                # optimiser steps; the λ and lr schedules run over them
    batch_size: int = 64             # per domain and per process: each step sees B source + B target
    lr: float = 0.01                 # μ0, the initial learning rate
    momentum: float = 0.9            # SGD momentum
    weight_decay: float = 5e-4       # L2 weight decay
    nesterov: bool = False           # Nesterov momentum (SGD)
    optimizer: str = "sgd"           # sgd (the paper's) | adam (fungtion/DANN's: lr 1e-3, no schedule, no decay)
    bn_per_domain: bool = False      # source and target through BatchNorm as two batches (fungtion/DANN) not one
    disc_bn: bool = False            # BatchNorm in G_d's hidden layers (fungtion/DANN, TLlib); default: dropout only
    backbone_lr_mult: float = 0.1    # resnet backbone lr = lr × this
    gamma: float = 10.0              # γ of λ_p = 2/(1+e^(−γp)) − 1
    lambda_max: float = 1.0          # λ_p is scaled by this (DANN users tune it up to 10×)
    lr_alpha: float = 10.0           # α of the lr schedule lr_p = μ0/(1+αp)^β
    lr_beta: float = 0.75            # β of the lr schedule
    lr_schedule: bool = True         # lr_p = μ0/(1+αp)^β; off: a constant μ0
    seed: int = 0                    # seeds weights, sampling and dropout (CPU runs repeat exactly)
    eval_every: int = 0              # steps between evaluations and checkpoints; 0: steps // 10
    log_every: int = 50              # steps between metrics.jsonl training records
    eval_samples: int = 10000        # cap on images per eval set
    target_holdout: float = 0.1      # fraction of the target training pool kept out for export's drift reference
    select: str = "im"               # best.pt by: im (label-free information maximisation) | target_acc
    data_dir: str | None = None      # where mnist/mnist_m/usps/svhn files are (default $ADAPTSERVE_DATA)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    amp: bool = True                 # mixed precision on CUDA (ignored on CPU)
    cpu_bf16: bool = False           # bfloat16 autocast on the CPU (opt-in: lower precision; fast with AVX512-BF16)
    channels_last: bool = False      # conv weights in NHWC layout too (activations already are; same math)
    compile: bool = False            # torch.compile the model
    threads: int = 0                 # torch intra-op threads on CPU; 0 = torch default
    tsne: bool = True                # t-SNE plot of source vs target features at the end

    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("--steps and --batch-size must be positive")
        if not 0.0 <= self.target_holdout < 1.0:
            raise ValueError("--target-holdout must be in [0, 1)")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.select not in ("im", "target_acc"):
            raise ValueError("--select must be im or target_acc")
        if self.lambda_max < 0:
            raise ValueError("--lambda-max must be >= 0 (a negative λ turns the gradient reversal around: the "
                             "features would help the discriminator instead of fooling it)")
        if self.arch == "auto":
            specs = (self.source, self.target)
            if any(s.split(":")[0] == "usps" for s in specs):
                self.arch = "lenet"
            elif any(s.startswith("folder:") for s in specs):
                self.arch = "resnet50"
            else:
                self.arch = "dann_mnist"
        if self.eval is None:
            kind = self.target.split(":")[0]
            self.eval = self.target if kind in ("folder", "npz") else f"{kind}:test"
        if self.eval_every <= 0:
            self.eval_every = max(1, self.steps // 10)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_sources(cls, file: str | Path | None = None, **overrides) -> "TrainConfig":
        """Defaults, then a YAML/JSON file, then non-None ``overrides`` (the CLI flags)."""
        values: dict = {}
        if file:
            loaded = yaml.safe_load(Path(file).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {file} must hold a mapping of option: value")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(unknown)}")
        return cls(**values)


def field_help() -> dict[str, str]:
    """One line of help per option for the CLI: the comment beside its field in :class:`TrainConfig`."""
    source = inspect.getsource(TrainConfig)
    return {m[1]: m[2].strip() for m in re.finditer(r"^    (\w+): [^#\n]*#(.*)$", source, re.M)}
