"""The training loop, top to bottom: data → model → optimiser → steps (eval, checkpoint) → plots, summary.

One step draws B source and B target images, runs them through the network in *one* concatenated
batch (so BatchNorm sees both domains together; ``--bn-per-domain``: as two batches), and minimises

    CE(source logits, source labels) + domain_loss(G_d(R_λ(f))) [+ w · MK-MMD²(f_s, f_t)]   (train/dann.py)
        [+ w_pl · L_pl(target pseudo-labels of the EMA teacher), from pseudo_start on]  (train/selftrain.py)

With ``--aug-rotate/--aug-scale/--aug-shift`` the network trains on randomly rotated, zoomed and shifted
copies of the step's images (train/augment.py) while the EMA teacher labels the plain target images.

With k sources (``--source`` repeated) a step draws B images from each, then B target images: ``dann``
and ``source-only`` treat the k·B source rows as one source (each source equally often); ``mdan`` adds
each source's own G_d^i and minimises :func:`train.dann.mdan_loss` of the per-source losses, while G_d
learns on detached features (the drift discriminator export ships).

with λ = lambda_max · λ_p for dann/cdan/cdan-e and λ = 0 for source-only (G_d still trains on
detached features, which gives source-only runs a domain accuracy and a discriminator for drift).

Multi-GPU/CPU: launched with ``torchrun --nproc-per-node N``, each process draws its own slice of
every step's batch from one shared sampler and DDP averages the gradients; rank 0 writes the files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from adaptserve.train import checkpoint as ckpt_io
from adaptserve.train.augment import random_affine, step_generator
from adaptserve.train.config import TrainConfig
from adaptserve.train.dann import (dann_lambda, domain_loss, entropy_weights, lr_factor, mdan_loss, mk_mmd, tail_factor,
                        warmup_factor)
from adaptserve.train.data import Dataset, holdout_split, load
from adaptserve.train.ema import EMA, refresh_bn
from adaptserve.train.evaluate import accuracy, diagnose, evaluate, predict
from adaptserve.train.metrics import MetricsLog
from adaptserve.train.selftrain import ClassThresholds, pseudo_label_loss, teacher_probs
from adaptserve.train.vada import vada_loss
from adaptserve.train.validators import score as validator_score
from adaptserve.train.models import ARCH_INPUT, build_model

log = logging.getLogger("adaptserve.train")
BN_BATCHES = 20  # training batches that recompute the EMA model's BatchNorm statistics at each evaluation


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA (this process's local GPU) when available, else CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def load_domains(cfg: TrainConfig, input_spec) -> dict:
    """Sources (labelled, one or several, same classes), target (its held-out part removed), the eval sets:
    each source's own (``source_evals``, ``eval_samples // k`` images each) and all of them together."""
    sources = []
    for spec in cfg.sources:
        ds = load(spec, input_spec, data_root=cfg.data_dir)
        if ds.labels is None:
            raise ValueError(f"the source {spec!r} has no labels (a folder needs class sub-folders)")
        if sources and ds.classes != sources[0].classes:
            raise ValueError(f"the sources disagree on their classes: {sources[0].spec!r} has {sources[0].classes}, "
                             f"{spec!r} has {ds.classes} (every source needs the same class names)")
        sources.append(ds)
    source = sources[0]
    target_pool = load(cfg.target, input_spec, data_root=cfg.data_dir, classes=source.classes, labels_optional=True)
    train_idx, _ = holdout_split(len(target_pool), cfg.target_holdout, groups=target_pool.groups)
    target = target_pool.subset(train_idx)
    if cfg.eval == cfg.target:  # folder/npz target: evaluate on its training part, never the held-out part
        target_eval = target
    else:
        target_eval = load(cfg.eval, input_spec, default_split="test", data_root=cfg.data_dir,
                           classes=source.classes)
    cap = lambda d, n: d.subset(np.random.default_rng(0).permutation(len(d))[:n]) if len(d) > n else d  # noqa: E731
    source_evals = []
    for spec, ds in zip(cfg.sources, sources):
        kind = spec.split(":")[0]
        test = ds if kind in ("folder", "npz") else load(f"{kind}:test", input_spec, data_root=cfg.data_dir)
        source_evals.append(cap(test, cfg.eval_samples // len(sources)))
    source_eval = source_evals[0] if len(sources) == 1 else Dataset(
        cfg.source_name, np.concatenate([d.images for d in source_evals]),
        np.concatenate([d.labels for d in source_evals]), source.classes)
    return {"sources": sources, "target": target, "source_evals": source_evals, "source_eval": source_eval,
            "target_eval": cap(target_eval, cfg.eval_samples)}


def param_groups(model, arch, cfg: TrainConfig) -> list[dict]:
    """Backbone parameters at lr × backbone_lr_mult, everything else at lr (the Office-31 recipe)."""
    backbone, rest = [], []
    prefix = f"features.{arch.backbone_prefix}" if arch.backbone_prefix else None
    for name, p in model.named_parameters():
        (backbone if prefix and name.startswith(prefix) else rest).append(p)
    groups = [{"params": rest, "lr_mult": 1.0}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr_mult": cfg.backbone_lr_mult})
    return groups


def run(cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``cfg`` into run directory ``out``; returns the summary dict (also ``summary.json``)."""
    cfg.validate()
    # ---- processes and device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    main = rank == 0
    np.random.seed(cfg.seed)

    # ---- model and data
    if cfg.arch not in ARCH_INPUT:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose from {', '.join(ARCH_INPUT)}")
    data = load_domains(cfg, ARCH_INPUT[cfg.arch])
    classes = data["sources"][0].classes
    S = len(data["sources"])
    torch.manual_seed(cfg.seed + rank)
    # DDP broadcasts rank 0's weights
    model, arch = build_model(cfg.arch, len(classes), cfg.method, cfg.pretrained, cfg.disc_bn, n_sources=S,
                              input_norm=cfg.input_norm)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D conv weights only; the math is unchanged
    on_device = device.type == "cuda" and sum(d.images.nbytes for d in [*data["sources"], data["target"]]) < 2**31
    # np.require copies read-only (memory-mapped / frombuffer) arrays: torch warns on non-writable memory
    tensor = lambda a: torch.from_numpy(np.require(a, requirements=["C", "W"])).to(device if on_device else "cpu")  # noqa: E731
    xs_all = [tensor(d.images) for d in data["sources"]]  # one per source
    ys_all = [tensor(d.labels) for d in data["sources"]]
    xt_all = tensor(data["target"].images)

    groups = param_groups(model, arch, cfg)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov)
    sampler = torch.Generator().manual_seed(cfg.seed)  # shared by all ranks: each takes its slice
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    balance = ClassThresholds(len(classes)) if cfg.pseudo_balance and cfg.pseudo_weight > 0 else None
    meta = {"arch": cfg.arch, "method": cfg.method, "classes": classes,
            "input_spec": arch.input_spec.to_dict(), "source": cfg.source_name, "sources": cfg.sources,
            "target": cfg.target,
            "target_holdout": cfg.target_holdout, "disc_bn": cfg.disc_bn, "input_norm": cfg.input_norm}

    start, best, history = 0, None, []
    ckdir = out / "checkpoints"
    if resume:
        state = ckpt_io.load(ckdir / "last.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler"])
        ckpt_io.set_rng_state(state["rng"], device)
        start, best, history = state["step"], state["best"], state["history"]
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if balance is not None and state.get("pseudo_classes") is not None:
            balance.load_state_dict(state["pseudo_classes"])
        if main:
            log.info("resumed %s at step %d/%d", out, start, cfg.steps)
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")

    net = model
    if cfg.compile:
        net = torch.compile(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = None
    if cfg.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif cfg.cpu_bf16 and device.type == "cpu":
        amp_dtype = torch.bfloat16  # no gradient scaler needed: bf16 has float32's exponent range
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def checkpoint_state(step: int) -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "sampler": sampler.get_state(), "rng": ckpt_io.rng_state(device), "best": best,
                "history": history, "meta": meta, "ema": ema.state_dict() if ema is not None else None,
                "pseudo_classes": balance.state_dict() if balance is not None else None}

    def do_eval(step: int) -> dict:
        shipped = model
        if ema is not None:  # the EMA weights are what gets evaluated, checkpointed as best and exported
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws:
                refresh_bn(ema.model, bn_batches(step),  # the training's random stream stays untouched
                           lambda m, x: m(x, 0.0, B if cfg.bn_per_domain else None))
            shipped = ema.model
        # One BLAS thread for numpy/scipy/sklearn: with 2 it fights torch's OpenMP threads, and the proxy
        # A-distance's logistic regression took 4.4 s instead of 0.16 s (docs/benchmarks.md §3).
        with threadpool_limits(1, user_api="blas"):
            m = evaluate(shipped, data["source_eval"], data["target_eval"], device, cfg.seed,
                         parts={s: len(d) for s, d in zip(cfg.sources, data["source_evals"])} if S > 1 else None)
        if ema is not None and data["target_eval"].labels is not None:
            m["trained_target_acc"] = accuracy(predict(model, data["target_eval"].images, device)[0],
                                               data["target_eval"].labels)
        m.update(kind="eval", step=step)
        history.append(m)
        return m

    def bn_batches(step: int, n: int = BN_BATCHES):
        """``n`` training batches (B from each source + B target, the training layout) from a generator of
        their own, so recomputing the EMA model's BN statistics leaves the training sampler where it was."""
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        for _ in range(n):
            idx = [torch.randint(len(xs), (B,), generator=g) for xs in [*xs_all, xt_all]]
            yield torch.cat([xs[i.to(xs.device)] for xs, i in zip([*xs_all, xt_all], idx)]).to(device)

    metrics = MetricsLog(out / "metrics.jsonl", start if resume else None) if main else None
    B = cfg.batch_size
    warned: set[str] = set()
    t0, images_seen, eval_time = time.perf_counter(), 0, 0.0
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method} {cfg.source_name}→{cfg.target}",
               disable=not (main and progress), unit="step", dynamic_ncols=True, mininterval=1.0)
    acc_sum = torch.zeros(4, device=device)  # loss_cls, loss_domain, batch source acc, batch domain acc
    aux_sum: dict[str, list] = {}  # the optional terms' [sum, steps]: loss_mmd, grad_norm, clipped, loss_pseudo, ...
    per_sum = torch.zeros(S, 4, device=device)  # each source's class loss, batch acc, domain acc, weight
    acc_n = 0
    n_src = S * B  # source rows at the front of each step's batch, B per source, then B target rows
    per_source = S > 1 or cfg.method == "mdan"  # per-source class losses, accuracies, weights in the log
    augment = max(cfg.aug_rotate, cfg.aug_scale, cfg.aug_shift) > 0
    balanced = lambda d_s, d_t: ((d_s < 0).float().mean() + (d_t >= 0).float().mean()) / 2  # noqa: E731
    net.train()
    for step in range(start, cfg.steps):
        p = step / cfg.steps
        lam = 0.0 if cfg.method == "source-only" else cfg.lambda_max * dann_lambda(p, cfg.gamma)
        lr_now = cfg.lr * (lr_factor(p, cfg.lr_alpha, cfg.lr_beta) if cfg.lr_schedule else 1.0)
        lr_now *= tail_factor(p, cfg.lr_decay_tail) * warmup_factor(step, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_mult"]

        # each source's rows, then the target's: one draw per domain from the shared sampler, each rank its slice
        idx = [torch.randint(len(xs), (world * B,), generator=sampler)[rank * B:(rank + 1) * B]
               for xs in [*xs_all, xt_all]]
        idx = [i.to(xt_all.device) for i in idx]
        x = torch.cat([xs[i] for xs, i in zip([*xs_all, xt_all], idx)]).to(device, non_blocking=True)
        y = torch.cat([ys[i] for ys, i in zip(ys_all, idx)]).to(device, non_blocking=True)
        x_plain = x  # the EMA teacher labels plain target images; the student sees augmented ones
        if augment:
            x = random_affine(x, step_generator(cfg.seed, step, rank), cfg.aug_rotate, cfg.aug_scale, cfg.aug_shift)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, f, d = net(x, lam, B if cfg.bn_per_domain else None)
            ce = F.cross_entropy(logits[:n_src].float(), y, reduction="none").view(S, B).mean(1) \
                if per_source else None  # (S,): each source's class loss
            if cfg.method == "mdan":  # column 0: G_d on detached features; column 1+i: source i's G_d^i
                dom = torch.stack([domain_loss(torch.cat([d[i * B:(i + 1) * B, 1 + i], d[n_src:, 1 + i]]), B)
                                   for i in range(S)])
                loss_adv, w = mdan_loss(ce, dom, cfg.mdan_gamma, cfg.mdan_mu, cfg.mdan_mode)
                d_ship = d[:, 0]
                loss = loss_adv + domain_loss(d_ship, n_src)
                loss_cls, loss_dom = ce.mean(), dom.mean()
            else:
                loss_cls = F.cross_entropy(logits[:n_src].float(), y)
                weights = entropy_weights(logits.float().softmax(1), n_src) if cfg.method == "cdan-e" else None
                loss_dom = domain_loss(d, n_src, weights)
                loss, d_ship, w = loss_cls + loss_dom, d, torch.full((S,), 1.0 / S, device=d.device)
            aux = {}
            if cfg.mmd_weight > 0:
                aux["loss_mmd"] = mk_mmd(f[:n_src], f[n_src:])
                loss = loss + cfg.mmd_weight * aux["loss_mmd"]
            if cfg.pseudo_weight > 0 and p >= cfg.pseudo_start:  # self-training: the EMA teacher's confident labels
                q = teacher_probs(ema.model if ema is not None else None, x_plain[n_src:], logits[n_src:])
                tau = cfg.pseudo_threshold
                if balance is not None:  # class-adaptive: τ_c from the teacher's running per-class confidence
                    balance.update(q, tau)
                    tau = balance.thresholds(tau)
                    aux["pseudo_tau_min"] = tau.min()
                aux["loss_pseudo"], aux["pseudo_used"] = pseudo_label_loss(logits[n_src:].float(), q, tau)
                loss = loss + cfg.pseudo_weight * aux["loss_pseudo"]
            if cfg.method == "vada":
                extra, terms = vada_loss(model, x, logits, n_src, cfg.vada_source_weight, cfg.vada_target_weight,
                                         cfg.vat_radius)
                loss = loss + extra
                aux.update(terms)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)  # clip the true gradient, not the fp16-scaled one
            aux["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            aux["clipped"] = (aux["grad_norm"] > cfg.grad_clip).float()
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema.update(model)
        images_seen += (S + 1) * B * world

        with torch.no_grad():
            dom_correct = balanced(d_ship[:n_src], d_ship[n_src:])  # balanced: k·B source rows vs B target rows
            hit = (logits[:n_src].argmax(1) == y).float().view(S, B).mean(1)
            acc_sum += torch.stack([loss_cls.detach(), loss_dom.detach(), hit.mean(), dom_correct])
            for k, v in aux.items():  # summed over the steps that had the term (loss_pseudo starts late)
                acc = aux_sum.setdefault(k, [0.0, 0])
                acc[0], acc[1] = acc[0] + v.detach().float(), acc[1] + 1
            if per_source:
                d_src = d[:, 1:] if cfg.method == "mdan" else d_ship.unsqueeze(1).expand(-1, S)
                dacc = torch.stack([balanced(d_src[i * B:(i + 1) * B, i], d_src[n_src:, i]) for i in range(S)])
                per_sum += torch.stack([ce.detach(), hit, dacc, w.to(ce.dtype)], 1)
            acc_n += 1
        done = step + 1
        if main and (done % cfg.log_every == 0 or done == cfg.steps):
            lc, ld, sa, da = (acc_sum / acc_n).tolist()
            rec = {"kind": "train", "step": done, "lr": lr_now, "lambda": lam, "loss_cls": lc,
                   "loss_domain": ld, "batch_source_acc": sa, "batch_domain_acc": da,
                   "images_per_s": images_seen / (time.perf_counter() - t0 - eval_time)}
            # means over the interval; grad_norm is before clipping, clipped the fraction of steps clipped
            rec.update({k: float(v) / n for k, (v, n) in aux_sum.items()})
            if per_source:  # domain_acc: source i vs target by G_d^i (mdan) or the one G_d
                rec["per_source"] = {name: dict(zip(("loss_cls", "batch_acc", "domain_acc", "weight"), v))
                                     for name, v in zip(cfg.sources, (per_sum / acc_n).tolist())}
            metrics.write(rec)
            bar.set_postfix(cls=f"{lc:.3f}", dom=f"{ld:.3f}", src=f"{sa:.2f}", d_acc=f"{da:.2f}", λ=f"{lam:.2f}")
            acc_sum.zero_()
            per_sum.zero_()
            aux_sum.clear()
            acc_n = 0
        if done % cfg.eval_every == 0 or done == cfg.steps:
            if main:
                t_eval = time.perf_counter()
                m = do_eval(done)
                metrics.write(m)
                by = cfg.select if cfg.select != "target_acc" or "target_acc" in m else "im"
                score = validator_score(m, by)
                if best is None or score > best["score"]:
                    best = {"score": score, "step": done, "by": by}
                    ckpt_io.save_atomic(checkpoint_state(done), ckdir / "best.pt")
                ckpt_io.save_atomic(checkpoint_state(done), ckdir / "last.pt")
                tgt = f" target {m['target_acc']:.1%}" if "target_acc" in m else ""
                bar.write(f"step {done}: source {m['source_acc']:.1%}{tgt} domain {m['domain_acc']:.1%} "
                          f"PAD {m['pad']:.2f} IM {m['im']:.3f}")
                for key, msg in diagnose(history, done / cfg.steps, cfg.method):
                    if key not in warned:
                        warned.add(key)
                        log.warning(msg)
                        metrics.write({"kind": "warning", "step": done, "key": key, "message": msg})
                eval_time += time.perf_counter() - t_eval
            if world > 1:
                torch.distributed.barrier()
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0

    summary = {}
    if main:
        metrics.close()
        final = history[-1]
        summary = {"recipe": cfg.recipe, "method": cfg.method, "arch": cfg.arch, "source": cfg.source_name,
                   "sources": cfg.sources,
                   "target": cfg.target, "ema": cfg.ema,
                   "eval": cfg.eval, "steps": cfg.steps, "seed": cfg.seed, "world_size": world,
                   "device": str(device), "wall_time_s": wall, "eval_time_s": eval_time,
                   "images_per_s": images_seen / (wall - eval_time),  # training steps only, rank 0's clock
                   "source_acc": final["source_acc"], "domain_acc": final["domain_acc"], "pad": final["pad"],
                   "im": final["im"], "best": best, "warnings": sorted(warned)}
        if "target_acc" in final:
            summary["target_acc"] = final["target_acc"]
            if "trained_target_acc" in final:  # with --ema: the optimiser's own weights, for comparison
                summary["trained_target_acc"] = final["trained_target_acc"]
            summary["best_target_acc"] = next(h["target_acc"] for h in history if h["step"] == best["step"])
        if "per_source" in final:
            summary["per_source"] = final["per_source"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        with threadpool_limits(1, user_api="blas"):
            _plots(out, cfg, ema.model if ema is not None else model, data, device)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _plots(out: Path, cfg: TrainConfig, model, data: dict, device) -> None:
    from adaptserve.train.plots import plot_curves, plot_tsne

    title = f"{cfg.method} {cfg.source_name} → {cfg.target} ({cfg.arch}, seed {cfg.seed})"
    plot_curves(out / "metrics.jsonl", out / "curves.png", title)
    if cfg.tsne:
        n = 500
        src, tgt = data["source_eval"], data["target_eval"]
        rng = np.random.default_rng(cfg.seed)
        i_s = rng.choice(len(src), min(n, len(src)), replace=False)
        i_t = rng.choice(len(tgt), min(n, len(tgt)), replace=False)
        _, fs, _ = predict(model, src.images[i_s], device)
        _, ft, _ = predict(model, tgt.images[i_t], device)
        plot_tsne(fs, src.labels[i_s], ft, None if tgt.labels is None else tgt.labels[i_t],
                  out / "tsne.png", cfg.seed, title)

