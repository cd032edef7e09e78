"""The log's warnings (train.evaluate.diagnose) on eval histories shaped like real runs (docs/troubleshooting.md)."""

from adaptserve.train.evaluate import diagnose


def history(source, domain):
    return [{"source_acc": s, "domain_acc": d, "target_acc": 0.1} for s, d in zip(source, domain)]


def keys(h, method="dann"):
    """Warning keys raised at any evaluation of ``h`` (10 evaluations → p = 0.1 ... 1.0)."""
    n = len(h)
    return {k for i in range(1, n + 1) for k, _ in diagnose(h[:i], i / n, method)}


# the demo's healthy DANN run (seed 0, 1,200 steps): nothing learns for ~250 steps, then all is well
HEALTHY = history([0.08, 0.33, 0.72, 0.83, 0.87, 0.90, 0.89, 0.94, 0.95, 0.94],
                  [0.50, 0.88, 0.83, 0.86, 0.93, 0.91, 0.92, 0.86, 0.95, 0.91])


def test_a_healthy_run_with_a_slow_start_raises_no_warning():
    assert keys(HEALTHY) == set()


def test_discriminator_winning_is_reported_only_for_adversarial_methods():
    h = history([0.3, 0.6, 0.8, 0.9, 0.95, 0.96, 0.97, 0.97, 0.98, 0.98], [0.9, 0.97] + [0.99] * 8)
    assert keys(h) == {"domain_stuck_high"}
    assert keys(h, "source-only") == set()  # there G_d is only a probe: it is expected to win


def test_features_collapsed_at_chance_with_low_source_accuracy():
    h = history([0.1, 0.11, 0.12, 0.1, 0.1, 0.11, 0.1, 0.1, 0.1, 0.1], [0.5, 0.51, 0.49] + [0.5] * 7)
    assert keys(h) == {"domain_stuck_chance", "source_low"}


def test_source_low_needs_two_low_evaluations_after_the_warm_up():
    dips_once = history([0.1, 0.2, 0.6, 0.45, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9], [0.7] * 10)
    assert keys(dips_once) == set()
    stays_low = history([0.1, 0.2, 0.3, 0.35, 0.4, 0.4, 0.45, 0.4, 0.4, 0.4], [0.7] * 10)
    assert keys(stays_low) == {"source_low"}


def test_source_low_reads_the_best_learnt_source_when_there_are_several():
    # DARN → MNIST, seed 1 (session 20): mnist_m gets no weight and is forgotten, the pooled source accuracy
    # falls to 42 % while usps is at 97.7 % and the target at 98.6 % — not a classifier that cannot learn
    def record(pooled, accs):
        return {"source_acc": pooled, "domain_acc": 0.75, "target_acc": 0.9,
                "per_source": {name: {"source_acc": a, "domain_acc": 0.7} for name, a in accs.items()}}
    darn = [record(0.45 - 0.01 * i, {"mnist_m": 0.3, "usps": 0.97, "syn": 0.6}) for i in range(10)]
    assert keys(darn, "mdan") == set()
    wrong_labels = [record(0.1, {"mnist_m": 0.1, "usps": 0.12, "syn": 0.1}) for _ in range(10)]
    assert keys(wrong_labels, "mdan") == {"source_low"}
