"""Plots of a run: ``curves.png`` (losses, accuracies, schedules) and ``tsne.png`` (feature alignment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaptserve.train.metrics import read_metrics


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def plot_curves(metrics_path: Path, out: Path, title: str = "") -> None:
    train, evals = read_metrics(metrics_path)
    sources = list(train[-1].get("per_source", {})) if train else []  # several sources (or MDAN): a third row
    plt, (fig, axes) = _figure(3 if sources else 2, 2, figsize=(11, 10.5 if sources else 7))
    ax = axes[0, 0]
    if train:
        s = [r["step"] for r in train]
        ax.plot(s, [r["loss_cls"] for r in train], label="source classification")
        ax.plot(s, [r["loss_domain"] for r in train], label="domain (G_d)")
        for key, label in (("loss_mmd", "MK-MMD² (source vs target features)"), ("loss_ent_t", "target entropy (VADA)"),
                           ("loss_vat_t", "VAT, target (VADA)"), ("loss_vat_s", "VAT, source (VADA)"),
                           ("loss_pseudo", "target pseudo-labels (self-training)"),
                           ("pseudo_used", "fraction of target rows pseudo-labelled"),
                           ("pseudo_tau_min", "lowest class threshold τ_c (--pseudo-balance)")):
            rows = [r for r in train if key in r]  # the optional terms (--mmd-weight, vada, --pseudo-weight from
            if rows:                               # --pseudo-start on)
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
        ax.axhline(2 * np.log(2), ls=":", c="grey", label="domain loss at chance (2 ln 2)")
    ax.set(title="training losses", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    if evals:
        s = [r["step"] for r in evals]
        ema = "trained_target_acc" in evals[0]  # with --ema the evaluated (shipped) weights are the EMA's
        for key, label in [("source_acc", "source acc"), ("target_acc", "target acc (EMA)" if ema else "target acc"),
                           ("trained_target_acc", "target acc (trained weights)"), ("domain_acc", "domain acc (G_d)")]:
            if key in evals[0]:
                ax.plot(s, [r[key] for r in evals], marker="o", ms=3, label=label)
        ax.axhline(0.5, ls=":", c="grey")
    ax.set(title="evaluation accuracy", xlabel="step", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    if train:
        ax.plot(s := [r["step"] for r in train], [r["lambda"] for r in train], label="λ (GRL coefficient)")
        ax.plot(s, [r["lr"] / max(r["lr"] for r in train) for r in train], label="lr / its peak")
        if "clipped" in train[0]:  # --grad-clip
            ax.plot(s, [r["clipped"] for r in train], label="fraction of steps with the gradient clipped")
    ax.set(title="schedules", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    if evals:
        s = [r["step"] for r in evals]
        ax.plot(s, [r["pad"] for r in evals], marker="o", ms=3, label="proxy A-distance (0 aligned, 2 apart)")
        if "mmd" in evals[0]:  # runs before the MMD metric have none
            ax.plot(s, [r["mmd"] for r in evals], marker="o", ms=3, label="feature MK-MMD² (0 aligned)")
        ax.plot(s, [r["im"] for r in evals], marker="o", ms=3, label="IM score on target (nats)")
    ax.set(title="alignment and label-free score", xlabel="step")
    ax.legend(fontsize=8)
    if sources:
        s = [r["step"] for r in train]
        for name in sources:
            axes[2, 0].plot(s, [r["per_source"][name]["weight"] for r in train], label=name)
            line, = axes[2, 1].plot(s, [r["per_source"][name]["domain_acc"] for r in train], label=f"{name} vs target")
            if evals and "per_source" in evals[0]:
                axes[2, 1].plot([r["step"] for r in evals], [r["per_source"][name]["source_acc"] for r in evals],
                                marker="o", ms=3, ls="--", c=line.get_color(), label=f"{name} eval accuracy")
        axes[2, 0].set(title="each source's weight in the gradient (MDAN: softmax(γ·L_i))", xlabel="step")
        axes[2, 1].axhline(0.5, ls=":", c="grey")
        axes[2, 1].set(title="per source: domain acc (its G_d, training batches), accuracy", xlabel="step",
                       ylim=(0, 1.02))
        for ax in axes[2]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_tsne(f_source: np.ndarray, y_source: np.ndarray, f_target: np.ndarray, y_target: np.ndarray | None,
              out: Path, seed: int = 0, title: str = "") -> None:
    """t-SNE of source vs target features: left coloured by domain, right by class."""
    from sklearn.manifold import TSNE

    n_s = len(f_source)
    emb = TSNE(n_components=2, init="pca", perplexity=30, random_state=seed).fit_transform(
        np.concatenate([f_source, f_target]).astype(np.float32))
    plt, (fig, axes) = _figure(1, 2, figsize=(12, 5.5))
    axes[0].scatter(*emb[:n_s].T, s=4, c="tab:blue", label="source")
    axes[0].scatter(*emb[n_s:].T, s=4, c="tab:red", label="target")
    axes[0].legend(markerscale=3)
    axes[0].set_title("by domain")
    axes[1].scatter(*emb[:n_s].T, s=4, c=y_source, cmap="tab10", marker="o")
    if y_target is not None:
        axes[1].scatter(*emb[n_s:].T, s=8, c=y_target, cmap="tab10", marker="x")
    axes[1].set_title("by class (o source, x target)")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
