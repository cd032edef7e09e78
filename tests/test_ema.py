"""EMA weights (train/ema.py): the update math, BatchNorm statistics recomputed for the average, and that
eval, best.pt and export use the EMA weights while training itself is untouched by them."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from adaptserve.train import checkpoint as ckpt_io
from adaptserve.train.config import TrainConfig
from adaptserve.train.ema import EMA, refresh_bn
from adaptserve.train.loop import run


def test_ema_update_is_the_warmed_up_moving_average():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.9)
    assert [ema.rate(t) for t in (1, 8, 80, 10_000)] == pytest.approx([2 / 11, 0.5, 0.9, 0.9])
    expected = 0.0
    for t, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
        assert ema.model.weight[0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert ema.updates == 4 and not ema.model.training and not ema.model.weight.requires_grad
    with pytest.raises(ValueError):
        EMA(net, decay=1.0)


def test_refresh_bn_gives_the_plain_average_of_the_batches_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].running_mean.fill_(100.0)  # stale statistics, e.g. averaged with the weights
    batches = [torch.randn(50, 3) * (i + 1) + i for i in range(4)]
    model.eval()
    assert refresh_bn(model, batches) == 1
    with torch.no_grad():
        h = [model[0](b) for b in batches]
    mean = torch.stack([x.mean(0) for x in h]).mean(0)
    var = torch.stack([x.var(0, unbiased=True) for x in h]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, rtol=1e-4)
    assert not model.training and model[1].momentum == 0.1  # mode and momentum restored


def _cfg(**kw) -> TrainConfig:
    base = dict(recipe="digits", arch="dann_mnist_bn28", optimizer="adam", lr=0.001, lr_schedule=False,
                weight_decay=0.0, bn_per_domain=True, disc_bn=True, steps=40, batch_size=32, eval_every=20,
                log_every=10, threads=1, tsne=False, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_eval_best_and_export_use_the_ema_weights_and_training_is_unchanged(tmp_path):
    from adaptserve.export import bundle
    from adaptserve.export.onnx_export import torch_outputs
    from adaptserve.service.preprocess import InputSpec
    from adaptserve.service.runtime import run_graphs, session
    from adaptserve.train.data import load
    from adaptserve.train.evaluate import accuracy, predict

    run(_cfg(ema=0.0), tmp_path / "plain", progress=False)
    summary = run(_cfg(ema=0.99), tmp_path / "ema", progress=False)
    plain = ckpt_io.load(tmp_path / "plain" / "checkpoints" / "last.pt")
    state = ckpt_io.load(tmp_path / "ema" / "checkpoints" / "last.pt")
    for k, v in plain["model"].items():  # the EMA (its BN refresh draws dropout masks) leaves training alone
        assert torch.equal(v, state["model"][k]), k
    assert plain["ema"] is None and state["ema"]["updates"] == 40

    model, meta, _ = ckpt_io.load_model(tmp_path / "ema" / "checkpoints" / "last.pt")
    ema_sd = state["ema"]["model"]
    assert all(torch.equal(v, ema_sd[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, state["model"][k]) for k, v in ema_sd.items() if v.dtype.is_floating_point)
    trained, _, _ = ckpt_io.load_model(tmp_path / "ema" / "checkpoints" / "last.pt", weights="trained")
    assert all(torch.equal(v, state["model"][k]) for k, v in trained.state_dict().items())

    target = load("demo-target:test", InputSpec.from_dict(meta["input_spec"]), classes=meta["classes"])
    probs = predict(model, target.images, torch.device("cpu"))[0]
    assert accuracy(probs, target.labels) == pytest.approx(summary["target_acc"])  # eval saw the EMA model
    assert "trained_target_acc" in summary
    recs = [json.loads(x) for x in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [20, 40]
    best = ckpt_io.load(tmp_path / "ema" / "checkpoints" / "best.pt")
    assert best["ema"] is not None

    work = tmp_path / "export"
    work.mkdir()
    bundle.build(tmp_path / "ema", work, checkpoint="last")
    x = target.images[:64]
    ort = run_graphs(session(work / "model.onnx", "cpu"), None, x)[0]
    assert np.abs(ort - torch_outputs(model, x)["probabilities"]).max() < 1e-4  # the ONNX graph is the EMA model
    assert np.abs(ort - torch_outputs(trained, x)["probabilities"]).max() > 1e-3
