"""Training configuration: defaults < YAML file (``--config``) < command-line flags.

The resolved config is written to ``RUN_DIR/config.yaml``; ``--resume RUN_DIR`` reads it back.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from adaptserve.train import recipes

METHODS = ("source-only", "dann", "cdan", "cdan-e", "mdan", "vada")
SELECTORS = ("im", "entropy", "snd", "dev", "last", "target_acc")


@dataclass
class TrainConfig:
    recipe: str = "paper"            # auto: the measured best for the arch family | paper | digits | lenet | resnet
    source: str | list = "demo-source"  # labelled source dataset spec; several: repeat --source (a list in YAML)
    target: str = "demo-target"      # unlabelled target dataset spec (labels, if any, are only used to report)
    eval: str | None = None          # dataset for target accuracy; default: the target's test split (or training part)
    method: str = "dann"             # source-only | dann | cdan | cdan-e | mdan (several sources, one G_d each) | vada (DANN + target entropy + VAT)
    arch: str = "auto"               # auto: lenet if USPS is involved (and no colour source), resnet50 for folders, else dann_mnist
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
    mdan_mode: str = "soft"          # MDAN: soft ((1/γ)·log Σ exp(γ·L_i)) | hard (max_i CE_i + μ·min_i domain_i) | darn (DARN's weights: the best-fitting sources count most)
    mdan_gamma: float = 10.0         # MDAN temperature γ (→ 0: mean of the sources; → ∞: soft the worst, darn the best)
    mdan_mu: float = 1.0             # MDAN μ, the weight of each source's domain loss (1: one source = DANN)
    vada_source_weight: float = 1.0  # VADA λ_s: weight of VAT on the source (0 skips its three extra passes)
    vada_target_weight: float = 0.01  # VADA λ_t: weight of the target's conditional entropy + VAT
    vat_radius: float = 3.5          # VAT perturbation radius (L2, on the normalised image; the reference code's 3.5)
    input_norm: str = "dataset"      # dataset: (x/255 − mean)/std | instance: each image and channel to mean 0, std 1 (in the ONNX graph)
    mmd_weight: float = 0.0          # weight of the MK-MMD² between source and target features (DAN) in the loss; 0: off
    pseudo_weight: float = 0.0       # weight of self-training on confident target pseudo-labels (train/selftrain.py); 0: off
    pseudo_threshold: float = 0.9    # a target row is pseudo-labelled when the teacher's max softmax is at least this
    pseudo_start: float = 0.5        # fraction of the steps after which the pseudo-label term is on
    pseudo_balance: bool = False     # class-adaptive thresholds τ_c: classes the teacher is unsure of get a lower one (train/selftrain.py)
    aug_rotate: float = 0.0          # random rotation of each training image (source and target), ± degrees; 0: off
    aug_scale: float = 0.0           # random zoom of each training image by a factor in [1/(1+s), 1+s]; 0: off
    aug_shift: float = 0.0           # random shift of each training image, ± this fraction of its size; 0: off
    grad_clip: float = 0.0           # clip the gradient's total norm to this before each step; 0: off
    warmup_steps: int = 0            # linear lr warm-up over the first N steps (then the schedule); 0: off
    lr_alpha: float = 10.0           # α of the lr schedule lr_p = μ0/(1+αp)^β
    lr_beta: float = 0.75            # β of the lr schedule
    lr_schedule: bool = True         # lr_p = μ0/(1+αp)^β; off: a constant μ0
    lr_decay_tail: float = 0.0       # fraction of the last steps over which the lr falls to 0 (cosine); 0: none
    ema: float = 0.0                 # decay of an EMA of the weights that eval, best.pt and export use; 0: off
    seed: int = 0                    # seeds weights, sampling and dropout (CPU runs repeat exactly)
    eval_every: int = 0              # steps between evaluations and checkpoints; 0: steps // 10
    log_every: int = 50              # steps between metrics.jsonl training records
    eval_samples: int = 10000        # cap on images per eval set
    target_holdout: float = 0.1      # fraction of the target training pool kept out for export's drift reference
    select: str = "im"               # best.pt by: im | entropy | snd | dev (label-free, docs/training.md) | last | target_acc
    data_dir: str | None = None      # where mnist/mnist_m/usps/svhn files are (default $ADAPTSERVE_DATA)
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    amp: bool = True                 # mixed precision on CUDA (ignored on CPU)
    cpu_bf16: bool = False           # bfloat16 autocast on the CPU (opt-in: lower precision; fast with AVX512-BF16)
    channels_last: bool = False      # conv weights in NHWC layout too (activations already are; same math)
    compile: bool = False            # torch.compile the model
    threads: int = 0                 # torch intra-op threads on CPU; 0 = torch default
    tsne: bool = True                # t-SNE plot of source vs target features at the end

    @property
    def sources(self) -> list[str]:
        """The source dataset specs, one or several."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @property
    def source_name(self) -> str:
        """``a+b+c``: the sources as one name (run directories, plots, the manifest's ``source``)."""
        return "+".join(self.sources)

    def validate(self) -> "TrainConfig":
        if not isinstance(self.source, str):  # a list from --source repeated or YAML; one source stays a str
            if not self.source or not all(isinstance(s, str) and s for s in self.source):
                raise ValueError("--source needs a dataset spec (or a list of them)")
            if len(set(self.source)) != len(self.source):
                raise ValueError(f"--source lists a dataset twice: {', '.join(self.source)}")
            self.source = self.source[0] if len(self.source) == 1 else list(self.source)
        if self.target in self.sources:
            raise ValueError(f"the target {self.target!r} is also a source")
        if self.mdan_mode not in ("soft", "hard", "darn"):
            raise ValueError(f"--mdan-mode must be soft, hard or darn, not {self.mdan_mode!r}")
        if self.mdan_gamma <= 0 or self.mdan_mu < 0:
            raise ValueError("--mdan-gamma must be > 0 and --mdan-mu >= 0")
        if len(self.sources) > 1 and self.method in ("cdan", "cdan-e"):
            raise ValueError(f"--method {self.method} takes one source; with several use dann (sources "
                             "combined), mdan or source-only")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("--steps and --batch-size must be positive")
        if not 0.0 <= self.target_holdout < 1.0:
            raise ValueError("--target-holdout must be in [0, 1)")
        if self.recipe not in recipes.NAMES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(recipes.NAMES)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose sgd or adam")
        if self.select not in SELECTORS:
            raise ValueError(f"--select must be one of {', '.join(SELECTORS)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("--ema must be in [0, 1) (a decay such as 0.999; 0 switches it off)")
        if not 0.0 <= self.lr_decay_tail <= 1.0:
            raise ValueError("--lr-decay-tail must be a fraction of the steps in [0, 1]")
        if self.lambda_max < 0:
            raise ValueError("--lambda-max must be >= 0 (a negative λ turns the gradient reversal around: the "
                             "features would help the discriminator instead of fooling it)")
        if self.input_norm not in ("dataset", "instance"):
            raise ValueError(f"--input-norm must be dataset or instance, not {self.input_norm!r}")
        if min(self.vada_source_weight, self.vada_target_weight, self.vat_radius) < 0:
            raise ValueError("--vada-source-weight, --vada-target-weight and --vat-radius must be >= 0")
        if self.pseudo_weight < 0 or not 0 <= self.pseudo_threshold < 1 or not 0 <= self.pseudo_start <= 1:
            raise ValueError("--pseudo-weight must be >= 0, --pseudo-threshold in [0, 1) and --pseudo-start in [0, 1]")
        if self.mmd_weight < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("--mmd-weight, --grad-clip and --warmup-steps must be >= 0 (0 switches each off)")
        if not (0 <= self.aug_rotate <= 180 and 0 <= self.aug_scale <= 1 and 0 <= self.aug_shift <= 0.5):
            raise ValueError("--aug-rotate must be in [0, 180] degrees, --aug-scale in [0, 1] and --aug-shift in "
                             "[0, 0.5] of the image size (0 switches each off)")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be below --steps {self.steps}")
        if self.arch == "auto":
            self.arch = recipes.auto_arch(self.sources, self.target)
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
    def from_sources(cls, file: str | Path | None = None, default_recipe: str = "auto", **overrides
                     ) -> "TrainConfig":
        """Field defaults, then the recipe (``recipe`` from the file or flags, else ``default_recipe``: see
        :mod:`train.recipes`), then a YAML/JSON file, then non-None ``overrides`` (the CLI flags).

        A saved run's ``config.yaml`` holds every option, so reading it back gives the same config; one
        written before recipes existed has no ``recipe`` key and is read with ``default_recipe="paper"``."""
        values: dict = {}
        if file:
            values.update(read_config_file(file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(unknown)}")
        d = cls()
        name, recipe = recipes.resolve(values.get("recipe", default_recipe), values.get("arch", d.arch),
                                       values.get("source", d.source), values.get("target", d.target),
                                       values.get("method", d.method))
        return cls(**{**recipe, **values, "recipe": name})


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice (PyYAML keeps the last one without a word)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_config_file(file: str | Path) -> dict:
    """A YAML/JSON config file → ``{option: value}`` (``-`` in names read as ``_``); ValueError naming the file
    and the line for a syntax error, a key given twice (as ``a-b`` and ``a_b`` too) or a non-mapping."""
    try:
        loaded = yaml.load(Path(file).read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {file} is not valid YAML: {problem}{where}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {file} must hold a mapping of option: value")
    values: dict = {}
    for k, v in loaded.items():
        name = str(k).replace("-", "_")
        if name in values:
            raise ValueError(f"config file {file}: option {name!r} is given twice")
        values[name] = v
    return values


def field_help() -> dict[str, str]:
    """One line of help per option for the CLI: the comment beside its field in :class:`TrainConfig`."""
    source = inspect.getsource(TrainConfig)
    return {m[1]: m[2].strip() for m in re.finditer(r"^    (\w+): [^#\n]*#(.*)$", source, re.M)}
