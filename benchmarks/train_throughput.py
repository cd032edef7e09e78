"""Training throughput: our DANN loop vs. a re-implementation of fungtion/DANN's loop, side by side.

    python benchmarks/train_throughput.py --steps 200 --repeats 2 --data-dir /work/shared/data

Both loops train MNIST → MNIST-M with batch 128 source + 128 target on the CPU at the same torch thread
count; throughput is source+target images per second of training steps (no evaluation, no setup).

* reference: fungtion/DANN's ``CNNModel`` and training loop (Adam 1e-3, NLLLoss, a source forward and a
  separate target forward per step), fed by torchvision-style per-item pipelines through
  ``DataLoader(shuffle=True, num_workers=2, drop_last=True)``. MNIST-M items are PNG-encoded once at
  setup and decoded per item with PIL, as the original reads PNG files. Timed after ``--warmup`` steps.
* ours: ``train.loop.run`` with ``arch=dann_mnist_bn`` (same network shape, 32×32×3 input, one
  concatenated source+target forward, uint8 tensors in memory). "ours" is the cumulative rate of the
  last ``train`` record in ``metrics.jsonl`` (includes the first steps); "ours after warm-up" is the
  rate between the records at steps ``--warmup`` and ``--steps``. The final eval is excluded.

Runs alternate reference/ours ``--repeats`` times; the table shows medians and ours/ref.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.preprocess import InputSpec  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import load  # noqa: E402
from train.loop import run  # noqa: E402

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
    mnist_m = load("mnist_m", InputSpec(28, 28, 3), data_root=data_dir)
    tf_source = transforms.Compose([transforms.Resize(28), transforms.ToTensor(),
                                    transforms.Normalize(mean=(0.1307,), std=(0.3081,))])
    tf_target = transforms.Compose([transforms.Resize(28), transforms.ToTensor(),
                                    transforms.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3)])
    return (MnistItems(mnist.images[..., 0], mnist.labels, tf_source),
            PngItems(mnist_m.images, mnist_m.labels, tf_target))


def reference_run(source: Dataset, target: Dataset, steps: int, warmup: int, threads: int) -> float:
    """fungtion/DANN's train/main.py loop on the CPU; images/s over the steps after ``warmup``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaders = [DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2, drop_last=True) for ds in (source, target)]
    net = CNNModel()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_class, loss_domain = nn.NLLLoss(), nn.NLLLoss()
    n_epoch, len_dataloader = 100, min(len(d) for d in loaders)
    net.train()
    done, t0 = 0, time.perf_counter()
    while done < warmup + steps:  # one pass of this loop = one epoch of the original
        source_iter, target_iter = iter(loaders[0]), iter(loaders[1])
        for _ in range(min(len_dataloader, warmup + steps - done)):
            p = done / n_epoch / len_dataloader
            alpha = 2.0 / (1.0 + np.exp(-10 * p)) - 1
            s_img, s_label = next(source_iter)
            net.zero_grad()
            class_output, domain_output = net(s_img, alpha)
            err_s_label = loss_class(class_output, s_label)
            err_s_domain = loss_domain(domain_output, torch.zeros(len(s_label), dtype=torch.long))
            t_img, _ = next(target_iter)
            _, domain_output = net(t_img, alpha)
            err_t_domain = loss_domain(domain_output, torch.ones(len(t_img), dtype=torch.long))
            err = err_t_domain + err_s_domain + err_s_label
            err.backward()
            optimizer.step()
            done += 1
            if done == warmup:
                t0 = time.perf_counter()
        del source_iter, target_iter  # stop this epoch's workers
    return 2 * BATCH * steps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- ours

def our_run(data_dir: str, steps: int, warmup: int, threads: int) -> tuple[float, float]:
    """``train.loop.run``; (cumulative images/s at the last step, images/s from step ``warmup`` on)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(source="mnist", target="mnist_m", method="dann", arch="dann_mnist_bn",
                          batch_size=BATCH, steps=steps, eval_every=steps, log_every=max(1, min(warmup, steps)),
                          eval_samples=1000, tsne=False, threads=threads, data_dir=data_dir)
        run(cfg, Path(tmp), progress=False)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    first, last = train[0], train[-1]
    elapsed = lambda r: 2 * BATCH * r["step"] / r["images_per_s"]  # noqa: E731  (rate is cumulative)
    steady = (2 * BATCH * (last["step"] - first["step"]) / (elapsed(last) - elapsed(first))
              if last is not first else last["images_per_s"])
    return last["images_per_s"], steady


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="reference steps run before timing starts")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("ADAPTSERVE_DATA"))
    args = ap.parse_args()
    logging.getLogger("adaptserve").setLevel(logging.ERROR)  # short runs trip the accuracy diagnostics

    t = time.perf_counter()
    source, target = reference_datasets(args.data_dir)
    print(f"reference data ready ({len(source)} + {len(target)} items, {time.perf_counter() - t:.0f} s)", flush=True)
    ref, ours, ours_steady = [], [], []
    for i in range(args.repeats):
        ref.append(reference_run(source, target, args.steps, args.warmup, args.threads))
        print(f"repeat {i + 1}: reference {ref[-1]:.0f} images/s", flush=True)
        cumulative, steady = our_run(args.data_dir, args.steps, args.warmup, args.threads)
        ours.append(cumulative)
        ours_steady.append(steady)
        print(f"repeat {i + 1}: ours {cumulative:.0f} images/s ({steady:.0f} after warm-up)", flush=True)

    med = statistics.median
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print()
    print("| date | nproc | torch | threads | steps | reference images/s | ours images/s | ours after warm-up "
          "| ours/ref |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {datetime.date.today()} | {nproc} | {torch.__version__} | {args.threads} | {args.steps} "
          f"(ref +{args.warmup} warm-up) | {med(ref):.0f} | {med(ours):.0f} | {med(ours_steady):.0f} "
          f"| {med(ours) / med(ref):.2f}× |")
    print(f"\nmedians of {args.repeats} alternating runs; per run: reference {', '.join(f'{x:.0f}' for x in ref)}; "
          f"ours {', '.join(f'{x:.0f}' for x in ours)}")


if __name__ == "__main__":
    main()
