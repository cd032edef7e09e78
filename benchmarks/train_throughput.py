"""Training throughput: our DANN loop vs. a re-implementation of fungtion/DANN's loop, side by side.

    python benchmarks/train_throughput.py --steps 40 --warmup 10 --repeats 3 --data-dir /work/shared/data

Every loop trains MNIST → MNIST-M with batch 128 source + 128 target on the CPU at the same torch thread
count (``--threads``); throughput is source+target images per second over ``--steps`` training steps
after ``--warmup`` untimed ones (no evaluation, no set-up). Like for like: the same network at the same
28×28×3 input on both sides (fungtion's ``CNNModel``; ours ``arch=dann_mnist_bn28``, the same layers).

* reference: fungtion/DANN's ``train/main.py`` loop — Adam 1e-3, NLLLoss, a separate source and target
  forward per step, the per-step buffer copy and loss read-outs — fed by torchvision-style per-item
  pipelines through ``DataLoader(shuffle=True, num_workers=W)``, W = 8 as shipped and 2 (``--workers``).
  MNIST-M items are PNG-encoded once at set-up and decoded per item with PIL, as the original reads PNG
  files (from memory here, not disk: if anything this flatters the reference).
* ours: ``train.loop.run`` (one concatenated source+target forward, SGD, uint8 tensors in memory, no
  workers) for each option set in ``--variants`` (channels_last, cpu_bf16, compile; see VARIANTS); the
  rate is read from ``metrics.jsonl`` between the records at steps ``warmup`` and ``warmup + steps``.
* data feed only (``--feed-steps``): both reference DataLoaders iterated without a model, and our loop's
  sampling + gather + concatenation — the part of a step that a GPU would leave exposed.

Each repeat runs every loop once, rotating the order between repeats; the table shows medians, the
individual runs, and the ratio to the reference as shipped.
"""

from __future__ import annotations

import argparse
import datetime
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptserve.service.preprocess import InputSpec  # noqa: E402
from adaptserve.train.config import TrainConfig  # noqa: E402
from adaptserve.train.data import load  # noqa: E402
from adaptserve.train.loop import run  # noqa: E402
from adaptserve.train.metrics import read_metrics  # noqa: E402

BATCH = 128


# --------------------------------------------------------------------------- reference (fungtion/DANN)

class ReverseLayerF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.neg() * ctx.alpha, None


class CNNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=5), nn.BatchNorm2d(64), nn.MaxPool2d(2), nn.ReLU(True),
            nn.Conv2d(64, 50, kernel_size=5), nn.BatchNorm2d(50), nn.Dropout2d(), nn.MaxPool2d(2), nn.ReLU(True))
        self.class_classifier = nn.Sequential(
            nn.Linear(50 * 4 * 4, 100), nn.BatchNorm1d(100), nn.ReLU(True), nn.Dropout(),
            nn.Linear(100, 100), nn.BatchNorm1d(100), nn.ReLU(True),
            nn.Linear(100, 10), nn.LogSoftmax(dim=1))
        self.domain_classifier = nn.Sequential(
            nn.Linear(50 * 4 * 4, 100), nn.BatchNorm1d(100), nn.ReLU(True),
            nn.Linear(100, 2), nn.LogSoftmax(dim=1))

    def forward(self, input_data, alpha):
        input_data = input_data.expand(input_data.data.shape[0], 3, 28, 28)
        feature = self.feature(input_data).view(-1, 50 * 4 * 4)
        reverse_feature = ReverseLayerF.apply(feature, alpha)
        return self.class_classifier(feature), self.domain_classifier(reverse_feature)


class MnistItems(Dataset):
    """torchvision.datasets.MNIST: a uint8 array row → PIL 'L' image → transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class PngItems(Dataset):
    """fungtion/DANN's GetLoader: PNG → PIL ``.convert('RGB')`` → transform (PNG bytes held in memory)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.pngs = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            self.pngs.append(buf.getvalue())
        self.labels, self.transform = labels, transform

    def __len__(self):
        return len(self.pngs)

    def __getitem__(self, i):
        return self.transform(Image.open(io.BytesIO(self.pngs[i])).convert("RGB")), int(self.labels[i])


def reference_datasets(data_dir: str) -> tuple[Dataset, Dataset]:
    mnist = load("mnist", InputSpec(28, 28, 1), data_root=data_dir)
    mnist_m = load("mnist_m", InputSpec(32, 32, 3), data_root=data_dir)  # 32×32 PNGs, resized per item
    tf_source = transforms.Compose([transforms.Resize(28), transforms.ToTensor(),
                                    transforms.Normalize(mean=(0.1307,), std=(0.3081,))])
    tf_target = transforms.Compose([transforms.Resize(28), transforms.ToTensor(),
                                    transforms.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3)])
    return (MnistItems(mnist.images[..., 0], mnist.labels, tf_source),
            PngItems(mnist_m.images, mnist_m.labels, tf_target))


def reference_steps(source: Dataset, target: Dataset, threads: int, workers: int, seed: int = 0):
    """fungtion/DANN's train/main.py loop on the CPU, one step per ``next()``: yields (step, net) after each
    optimizer step, epoch after epoch (its λ schedule runs over 100 epochs)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    loaders = [DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True)
               for ds in (source, target)]
    net = CNNModel()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_class, loss_domain = nn.NLLLoss(), nn.NLLLoss()
    n_epoch, len_dataloader = 100, min(len(d) for d in loaders)
    net.train()
    done = 0
    while True:  # one pass of this loop = one epoch of the original
        source_iter, target_iter = iter(loaders[0]), iter(loaders[1])
        for _ in range(len_dataloader):
            p = done / n_epoch / len_dataloader
            alpha = 2.0 / (1.0 + np.exp(-10 * p)) - 1
            s_img, s_label = next(source_iter)
            net.zero_grad()
            input_img = torch.FloatTensor(BATCH, 3, 28, 28).resize_as_(s_img).copy_(s_img)  # as the original
            class_output, domain_output = net(input_img, alpha)
            err_s_label = loss_class(class_output, s_label)
            err_s_domain = loss_domain(domain_output, torch.zeros(len(s_label), dtype=torch.long))
            t_img, _ = next(target_iter)
            input_img = torch.FloatTensor(BATCH, 3, 28, 28).resize_as_(t_img).copy_(t_img)
            _, domain_output = net(input_img, alpha)
            err_t_domain = loss_domain(domain_output, torch.ones(len(t_img), dtype=torch.long))
            err = err_t_domain + err_s_domain + err_s_label
            err.backward()
            optimizer.step()
            _ = (err_s_label.item(), err_s_domain.item(), err_t_domain.item())  # its per-step print, unprinted
            done += 1
            yield done, net
        del source_iter, target_iter  # stop this epoch's workers


def reference_run(source: Dataset, target: Dataset, steps: int, warmup: int, threads: int, workers: int) -> float:
    """fungtion/DANN's train/main.py loop on the CPU; images/s over the steps after ``warmup``."""
    t0 = time.perf_counter()
    for done, _ in reference_steps(source, target, threads, workers):
        if done == warmup:
            t0 = time.perf_counter()
        if done == warmup + steps:
            break
    return 2 * BATCH * steps / (time.perf_counter() - t0)


def reference_feed(source: Dataset, target: Dataset, steps: int, warmup: int, workers: int) -> float:
    """The reference's data feed alone (both DataLoaders, no model): source+target images/s."""
    loaders = [DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True)
               for ds in (source, target)]
    its = [iter(d) for d in loaders]
    for _ in range(warmup):
        next(its[0]), next(its[1])
    t0 = time.perf_counter()
    for _ in range(steps):
        next(its[0]), next(its[1])
    rate = 2 * BATCH * steps / (time.perf_counter() - t0)
    del its
    return rate


# --------------------------------------------------------------------------- ours

VARIANTS = {  # name → TrainConfig overrides
    "default": {},
    "channels_last": {"channels_last": True},
    "cpu_bf16": {"cpu_bf16": True},
    "channels_last+cpu_bf16": {"channels_last": True, "cpu_bf16": True},
    "compile": {"compile": True},
    "compile+channels_last+cpu_bf16": {"compile": True, "channels_last": True, "cpu_bf16": True},
}


def our_run(data_dir: str, steps: int, warmup: int, threads: int, **overrides) -> tuple[float, float]:
    """``train.loop.run``; (images/s from step ``warmup`` to the end, cumulative images/s at the end)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(source="mnist", target="mnist_m", method="dann", arch="dann_mnist_bn28",
                          batch_size=BATCH, steps=warmup + steps, eval_every=warmup + steps, log_every=warmup,
                          eval_samples=1000, tsne=False, threads=threads, data_dir=data_dir, **overrides)
        run(cfg, Path(tmp), progress=False)
        train, _ = read_metrics(Path(tmp) / "metrics.jsonl")
    first, last = train[0], train[-1]
    assert first["step"] == warmup and last["step"] == warmup + steps
    elapsed = lambda r: 2 * BATCH * r["step"] / r["images_per_s"]  # noqa: E731  (rate is cumulative)
    return 2 * BATCH * steps / (elapsed(last) - elapsed(first)), last["images_per_s"]


def our_feed(data_dir: str, steps: int) -> float:
    """Our data feed alone: the loop's sampling, gather and concatenation of in-memory uint8 tensors."""
    xs, xt = (torch.as_tensor(np.ascontiguousarray(load(name, InputSpec(28, 28, 3), data_root=data_dir).images))
              for name in ("mnist", "mnist_m"))  # as train.loop.run holds them
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 10):
        if i == 10:
            t0 = time.perf_counter()
        idx_s, idx_t = torch.randint(len(xs), (BATCH,), generator=g), torch.randint(len(xt), (BATCH,), generator=g)
        x = torch.cat([xs[idx_s], xt[idx_t]])
    assert x.shape == (2 * BATCH, 28, 28, 3)
    return 2 * BATCH * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", default="8,2", help="reference DataLoader worker counts (8 = as shipped)")
    ap.add_argument("--variants", default="default,channels_last,cpu_bf16,channels_last+cpu_bf16",
                    help=f"our loop's option sets, from: {', '.join(VARIANTS)}")
    ap.add_argument("--feed-steps", type=int, default=50, help="steps of the data-feed-only measurement (0: skip)")
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA"))
    args = ap.parse_args()
    logging.getLogger("adaptserve").setLevel(logging.ERROR)  # short runs trip the accuracy diagnostics
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 workers on 2 CPUs, as shipped
    workers = [int(w) for w in args.workers.split(",")]
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")

    t = time.perf_counter()
    source, target = reference_datasets(args.data_dir)
    print(f"reference data ready ({len(source)} + {len(target)} items, {time.perf_counter() - t:.0f} s)", flush=True)
    rates: dict[str, list[float]] = {}

    def record(name: str, rate: float) -> None:
        rates.setdefault(name, []).append(rate)
        print(f"  {name}: {rate:.0f} images/s", flush=True)

    for i in range(args.repeats):  # alternate every loop within each repeat; rotate the order between repeats
        jobs = [(f"reference, {w} workers", lambda w=w: reference_run(source, target, args.steps, args.warmup,
                                                                        args.threads, w)) for w in workers]
        jobs += [(f"ours, {v}", lambda v=v: our_run(args.data_dir, args.steps, args.warmup, args.threads,
                                                     **VARIANTS[v])[0]) for v in variants]
        k = i % len(jobs)
        print(f"repeat {i + 1}/{args.repeats} ({os.getloadavg()[0]:.1f} load average)", flush=True)
        for name, job in jobs[k:] + jobs[:k]:
            record(name, job())
    if args.feed_steps:
        for i in range(args.repeats):
            print(f"data feed only, repeat {i + 1}/{args.repeats}", flush=True)
            for w in workers:
                record(f"reference feed, {w} workers", reference_feed(source, target, args.feed_steps, 5, w))
            record("our feed", our_feed(args.data_dir, args.feed_steps))

    med = statistics.median
    base = f"reference, {workers[0]} workers"
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {nproc} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads, batch {BATCH}+{BATCH}, {args.steps} timed steps after {args.warmup}, "
          f"medians of {args.repeats} alternating runs, load average now {os.getloadavg()[0]:.1f}\n")
    print(f"| loop | images/s (median) | runs | vs {base} |")
    print("| --- | --- | --- | --- |")
    for name, xs in rates.items():
        ref = f"reference feed, {workers[0]} workers" if "feed" in name else base
        ratio = f"{med(xs) / med(rates[ref]):.2f}×" if ref in rates else ""
        print(f"| {name} | {med(xs):,.0f} | {', '.join(f'{x:,.0f}' for x in xs)} | {ratio} |")


if __name__ == "__main__":
    main()
