"""Recipes (train/recipes.py): what `adaptserve train` starts from, and that `--recipe paper` is the old default."""

import re

import pytest
import yaml

from adaptserve.train.config import TrainConfig

# The defaults of `adaptserve train` up to session 5 (before recipes): the paper's SGD recipe.
OLD_DEFAULTS = dict(source="demo-source", target="demo-target", method="dann", arch="auto", steps=2000,
                    batch_size=64, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=False, optimizer="sgd",
                    bn_per_domain=False, disc_bn=False, backbone_lr_mult=0.1, gamma=10.0, lambda_max=1.0,
                    lr_alpha=10.0, lr_beta=0.75, lr_schedule=True, seed=0, target_holdout=0.1, select="im",
                    lr_decay_tail=0.0, ema=0.0)


def test_paper_recipe_is_exactly_the_old_default():
    cfg = TrainConfig.from_sources(None, recipe="paper")
    assert cfg == TrainConfig() and cfg.recipe == "paper"
    assert {k: getattr(cfg, k) for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert cfg.validate().arch == "dann_mnist"


@pytest.mark.parametrize("source, target, recipe, arch, optimizer", [
    ("demo-source", "demo-target", "digits", "dann_mnist_bn28", "adam"),
    ("mnist", "mnist_m", "digits", "dann_mnist_bn28", "adam"),
    ("mnist", "usps", "lenet", "lenet", "sgd"),
    ("usps", "mnist", "lenet", "lenet", "sgd"),
    ("folder:a", "folder:b", "resnet", "resnet50", "sgd"),
    (["mnist", "mnist_m", "syn"], "usps", "lenet", "lenet", "sgd"),  # USPS target: grey LeNet (§11: 95.5 vs 69.5)
    (["mnist", "usps", "syn"], "mnist_m", "digits", "dann_mnist_bn28", "adam"),  # a colour target keeps colour
])
def test_auto_picks_the_recipe_of_the_architecture_family(source, target, recipe, arch, optimizer):
    cfg = TrainConfig.from_sources(None, source=source, target=target).validate()
    assert (cfg.recipe, cfg.arch, cfg.optimizer) == (recipe, arch, optimizer) and cfg.ema > 0


def test_precedence_recipe_then_file_then_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 0.002\nbatch_size: 32\n")
    cfg = TrainConfig.from_sources(f, batch_size=16)
    assert (cfg.recipe, cfg.optimizer, cfg.lr, cfg.batch_size) == ("digits", "adam", 0.002, 16)
    assert TrainConfig.from_sources(None, arch="lenet").recipe == "lenet"  # the family of the arch given
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig.from_sources(None, recipe="magic")


def test_saved_config_reads_back_the_same_and_old_ones_as_paper(tmp_path):
    cfg = TrainConfig.from_sources(None, steps=123).validate()
    cfg.save(tmp_path / "config.yaml")
    assert TrainConfig.from_sources(tmp_path / "config.yaml", default_recipe="paper") == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("recipe", "ema", "lr_decay_tail")}
    old.update(optimizer="sgd", arch="dann_mnist", lr=0.01)
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    back = TrainConfig.from_sources(tmp_path / "old.yaml", default_recipe="paper")  # what --resume does
    assert back.recipe == "paper" and back.ema == 0.0 and back.lr_decay_tail == 0.0


def test_a_broken_config_file_is_a_clear_error_naming_the_line(tmp_path, cli):
    """A key given twice (PyYAML would keep the last one without a word — a hand-edited config.yaml that
    appended `pseudo_balance: true` under the saved `pseudo_balance: false` trained without it), the same
    option as `a-b` and `a_b`, and a YAML syntax error: ValueError naming the file and the line; the CLI
    says so in one line, no traceback, no run directory."""
    cases = {"steps: 10\nsteps: 20\n": "'steps' is given twice (line 2",
             "pseudo-balance: true\npseudo_balance: false\n": "option 'pseudo_balance' is given twice",
             "steps: [10\n": "is not valid YAML"}
    for i, (text, message) in enumerate(cases.items()):
        f = tmp_path / f"c{i}.yaml"
        f.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig.from_sources(f)
    import subprocess

    r = subprocess.run(cli + ["train", "--config", str(tmp_path / "c2.yaml"), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "c2.yaml is not valid YAML" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_train_help_names_the_default_recipe(cli):
    import subprocess

    r = subprocess.run(cli + ["train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--recipe" in r.stdout and "(default auto)" in " ".join(r.stdout.split())


def test_lenet_recipe_is_the_measured_usps_setting_and_flags_still_win():
    """docs/benchmarks.md §12d: 5,000 steps, self-training, ±10° / ×1.4 / 10 % augmentation (MNIST → USPS
    87.9 → 97.4 % over 3 seeds); flags override each, and the digits recipe sets none of them."""
    cfg = TrainConfig.from_sources(None, source="mnist", target="usps").validate()
    assert (cfg.recipe, cfg.steps, cfg.pseudo_weight, cfg.aug_rotate, cfg.aug_scale, cfg.aug_shift) == \
        ("lenet", 5000, 1.0, 10.0, 0.4, 0.1)
    off = TrainConfig.from_sources(None, source="usps", target="mnist", steps=300, pseudo_weight=0.0, aug_scale=0.0)
    assert (off.steps, off.pseudo_weight, off.aug_scale, off.aug_rotate) == (300, 0.0, 0.0, 10.0)
    digits = TrainConfig.from_sources(None, source="mnist", target="mnist_m")  # augmentation hurt MNIST-M: not here
    assert (digits.steps, digits.pseudo_weight, digits.aug_scale) == (2000, 0.0, 0.0)


def test_source_only_baseline_gets_no_self_training_from_the_recipe():
    """Self-training learns from target images: the lenet recipe's must not turn the source-only baseline
    into an adapted model (it did in session 14: 97.9 % "source-only" on MNIST → USPS); a flag still can."""
    so = TrainConfig.from_sources(None, source="mnist", target="usps", method="source-only").validate()
    assert (so.recipe, so.pseudo_weight, so.aug_scale) == ("lenet", 0.0, 0.4)  # augmentation is source-side
    assert TrainConfig.from_sources(None, source="mnist", target="usps", method="dann").pseudo_weight == 1.0
    assert TrainConfig.from_sources(None, source="mnist", target="usps", method="source-only",
                                    pseudo_weight=1.0).pseudo_weight == 1.0
