"""`adaptserve export`: a tiny real run → ONNX graphs + drift reference → BentoML store / folder → runtime.

One model is trained (40 steps) and exported once per module; BENTOML_HOME is a temporary folder
(tests/conftest.py sets it before bentoml is imported).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import adaptserve
from adaptserve.export import bundle
from adaptserve.export.onnx_export import torch_outputs
from adaptserve.train.checkpoint import load_model
from adaptserve.service.preprocess import ImageError, InputSpec
from adaptserve.service.runtime import FILES, IntegrityError, Model
from adaptserve.train.config import TrainConfig
from adaptserve.train.data import load
from adaptserve.train.checkpoint import load as ckpt_io_load
from adaptserve.train.loop import run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")]


def store_models() -> set[str]:
    import bentoml

    return {str(m.tag) for m in bentoml.models.list()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    run(TrainConfig(steps=40, batch_size=32, eval_every=20, threads=1, tsne=False), base / "run", progress=False)
    tag, manifest = bundle.export(base / "run", name="test-dann", out=base / "model", n_bootstrap=200)
    model, meta, _ = load_model(base / "run" / "checkpoints" / "best.pt")
    images = load("demo-target:test", InputSpec.from_dict(meta["input_spec"])).images
    return {"base": base, "run": base / "run", "out": base / "model", "tag": tag, "manifest": manifest,
            "model": model, "meta": meta, "images": images}


def test_export_writes_store_model_and_folder(exported):
    assert exported["tag"].startswith("test-dann:") and exported["tag"] in store_models()
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "manifest.json"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "dann" and m["arch"] == "dann_mnist" and m["classes"] == [str(i) for i in range(10)]
    assert m["source"] == "demo-source" and m["target"] == "demo-target" and m["opset"] >= 18
    assert m["training_config"]["steps"] == 40 and "target_acc" in m["run"]["accuracies"]
    assert len(m["checkpoint"]["sha256"]) == 64 and set(m["files"]) == set(FILES)
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    d = m["drift"]
    # 10 % of the demo target held out = 144 digits in 6 copies: 72 independent calibration digits → W = 72
    assert d["window"] == d["n_calibration_independent"] and 60 <= d["window"] < 200 and d["warnings"] == []
    assert d["alpha"] == 0.01 and d["n_bootstrap"] == 200 and d["seed"] == 0
    assert d["n_reference"] + d["n_calibration"] == d["reference_images"] >= 256
    assert "held-out" in d["reference"]
    assert m["parity"]["images"] >= 256 and m["parity"]["max_abs_diff_probabilities"] <= 1e-4


def test_classifier_graph_has_no_discriminator_and_declares_its_interface(exported):
    path = exported["out"] / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    g = onnx.load(str(path))
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert all(n.domain in ("", "ai.onnx") for n in g.graph.node), "custom op (a GRL?) in the graph"
    names = [n.name for n in g.graph.node] + [i.name for i in g.graph.initializer]
    assert not [n for n in names if "discriminator" in n.lower() or "grad" in n.lower()]
    inits = [onnx.numpy_helper.to_array(i) for i in g.graph.initializer]
    disc = [p.detach().numpy() for k, p in exported["model"].state_dict().items() if k.startswith("discriminator.")]
    assert disc
    for w in disc:
        assert not any(a.shape == w.shape and np.allclose(a, w) for a in inits), "discriminator weight in model.onnx"
    (inp,) = g.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert [o.name for o in g.graph.output] == ["probabilities", "logits", "features"]
    props = {p.key: p.value for p in g.metadata_props}
    assert json.loads(props["classes"]) == exported["meta"]["classes"] and props["method"] == "dann"
    assert json.loads(props["input_spec"]) == {"height": 32, "width": 32, "channels": 3} and props["arch"] == "dann_mnist"
    d = onnx.load(str(exported["out"] / "discriminator.onnx"))
    assert [i.name for i in d.graph.input] == ["features", "probabilities"]
    assert [o.name for o in d.graph.output] == ["p_target"]


@pytest.mark.parametrize("n", [1, 257])
def test_onnx_runtime_matches_pytorch_on_demo_target_images(exported, n):
    model = Model.open(exported["out"], device="cpu")
    x = exported["images"][:n]
    pred = model.predict(x)
    ref = torch_outputs(exported["model"], x)
    assert pred.probabilities.shape == (n, 10) and pred.p_target.shape == (n,)
    assert np.abs(pred.probabilities - ref["probabilities"]).max() <= 1e-4
    assert np.abs(pred.p_target - ref["p_target"]).max() <= 1e-4
    assert np.array_equal(pred.predictions, ref["probabilities"].argmax(1))
    assert pred.labels == [str(i) for i in pred.predictions]


def test_in_graph_preprocessing_equals_training_preprocessing(exported):
    x = exported["images"][:64]
    feats = Model.open(exported["out"], device="cpu").predict(x).features
    m = exported["model"]
    with torch.no_grad():
        expected = m.features(m.normalize(torch.as_tensor(x))).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)


def test_runtime_validates_inputs(exported):
    model = Model.open(exported["out"], device="cpu")
    assert len(model.predict(exported["images"][0])) == 1  # one (H, W, C) image
    assert len(model.predict(np.zeros((3, 28, 28), np.uint8))) == 3  # grey 28×28 → padded 32×32×3
    for bad, message in [(np.zeros((2, 3, 32, 32, 3), np.uint8), "rank"),
                         (np.full((2, 32, 32, 3), 2.0, np.float32), r"\[0, 1\]"),
                         (np.full((2, 32, 32, 3), 300, np.int32), r"\[0, 255\]"),
                         (np.zeros((2, 32, 32, 2), np.uint8), "channels"),
                         (np.zeros((2, 32, 32, 3), np.complex64), "dtype"),
                         (np.zeros((0, 32, 32, 3), np.uint8), "empty")]:
        with pytest.raises(ImageError, match=message):
            model.predict(bad)


def test_manifest_hashes_verify_and_a_flipped_byte_is_refused(exported, tmp_path):
    Model.open(exported["out"])
    copy = tmp_path / "m"
    shutil.copytree(exported["out"], copy)
    raw = bytearray((copy / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="model.onnx does not match its manifest"):
        Model.open(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        Model.open(copy)
    assert issubclass(IntegrityError, ValueError)


def test_a_model_opened_from_its_bytes_answers_like_its_folder_and_is_verified_the_same(exported):
    """Model.from_files (what a Ray actor opens) = Model.open of the folder; a flipped byte or a missing file
    in memory is refused with the folder's messages."""
    folder = Path(exported["out"])
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    a, b = Model.open(folder, threads=1), Model.from_files(files, threads=1)
    x = exported["images"][:50]
    pa, pb = a.predict(x), b.predict(x)
    np.testing.assert_array_equal(pa.probabilities, pb.probabilities)
    np.testing.assert_array_equal(pa.p_target, pb.p_target)
    np.testing.assert_array_equal(a.drift_reference.projections, b.drift_reference.projections)
    flipped = bytearray(files["discriminator.onnx"])
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="discriminator.onnx does not match its manifest"):
        Model.from_files({**files, "discriminator.onnx": bytes(flipped)})
    with pytest.raises(IntegrityError, match="drift_reference.npz is missing"):
        Model.from_files({k: v for k, v in files.items() if k != "drift_reference.npz"})
    with pytest.raises(IntegrityError, match="no manifest.json"):
        Model.from_files({k: v for k, v in files.items() if k != "manifest.json"})


def test_store_round_trip(exported):
    import bentoml

    tag = exported["tag"]
    bm = bentoml.models.get(tag)
    assert bm.info.labels["method"] == "dann" and bm.info.metadata["classes"] == exported["meta"]["classes"]
    by_tag, latest = Model.open(tag), Model.open("test-dann:latest")
    assert by_tag.tag == latest.tag == tag and by_tag.providers == ["CPUExecutionProvider"]
    assert by_tag.manifest == json.loads((exported["out"] / "manifest.json").read_text())
    x = exported["images"][:32]
    np.testing.assert_array_equal(by_tag.predict(x).probabilities, Model.open(exported["out"]).predict(x).probabilities)
    ref = by_tag.drift_reference
    assert ref.window == exported["manifest"]["drift"]["window"]
    assert ref.projections.shape[1] == 10 and ref.null_mmd2.shape == (200,)
    p = by_tag.predict(exported["images"][:ref.window])
    result = ref.check(p.p_target, p.probabilities, p.features)
    assert set(result) == {"ks_discriminator", "ks_softmax_bonferroni", "mmd_pca", "drift"}


def _cli_error(capsys, args) -> str:
    assert adaptserve.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_errors_exit_2_and_leave_nothing_behind(exported, tmp_path, capsys):
    before = store_models()
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert "no checkpoint best.pt" in _cli_error(capsys, ["export", str(tmp_path / "empty"), "--out", str(out)])

    state = torch.load(exported["run"] / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    state["meta"]["arch"] = "dann_mnist_bn"
    (tmp_path / "wrong" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "wrong" / "checkpoints" / "best.pt")
    err = _cli_error(capsys, ["export", str(tmp_path / "wrong"), "--out", str(out)])
    assert "do not fit architecture 'dann_mnist_bn'" in err

    two_channels, few = tmp_path / "two.npz", tmp_path / "few.npz"
    np.savez(two_channels, images=np.zeros((300, 32, 32, 2), np.uint8))
    np.savez(few, images=exported["images"][:100])
    run_dir = str(exported["run"])
    err = _cli_error(capsys, ["export", run_dir, "--reference", f"npz:{two_channels}", "--out", str(out)])
    assert "channels" in err
    err = _cli_error(capsys, ["export", run_dir, "--reference", f"npz:{few}", "--out", str(out)])
    assert "has 100 images; export needs at least 256" in err
    err = _cli_error(capsys, ["export", run_dir, "--out", str(exported["out"])])
    assert "already exists and is not empty" in err
    assert store_models() == before and not out.exists()


def test_a_failure_inside_the_store_block_discards_the_model(exported, tmp_path):
    before = store_models()
    out = tmp_path / "out"

    def boom(bm):
        assert (Path(bm.path) / "model.onnx").is_file()  # the files were already copied in
        raise RuntimeError("simulated failure")

    with pytest.raises(RuntimeError, match="simulated"):
        bundle.save(exported["out"], exported["manifest"], "test-dann", out, _fail_in_store=boom)
    assert store_models() == before and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_runtime_imports_without_torch():
    code = "import adaptserve.service.runtime, adaptserve.service.drift, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


def test_parity_check_fails_with_the_numbers():
    from adaptserve.export.onnx_export import ExportError, check_parity

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), 256).astype(np.float32)
    ref = {"probabilities": p, "features": rng.normal(size=(256, 8)), "p_target": rng.random(256)}
    assert check_parity(ref, dict(ref))["argmax_mismatches"] == 0
    off = dict(ref, probabilities=p + np.float32(3e-4))
    with pytest.raises(ExportError, match=r"max \|Δ probabilities\| 0.0003"):
        check_parity(ref, off)
    flipped = p.copy()
    flipped[0] = flipped[0][::-1]
    with pytest.raises(ExportError, match=" 1 argmax mismatches"):
        check_parity(ref, dict(ref, probabilities=flipped))


def test_fungtion_recipe_model_trains_exports_and_matches_pytorch(tmp_path):
    """Adam, BN per domain and BatchNorm in G_d (benchmarks/recipes/fungtion_mnist_m.yaml) reach the
    exported graphs: the discriminator's BN runs with its running statistics in ONNX as in PyTorch."""
    cfg = TrainConfig(arch="dann_mnist_bn28", optimizer="adam", lr=1e-3, lr_schedule=False, weight_decay=0.0,
                      bn_per_domain=True, disc_bn=True, steps=20, batch_size=32, eval_every=20, threads=1,
                      tsne=False)
    run(cfg, tmp_path / "run", progress=False)
    state = ckpt_io_load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert "exp_avg" in state["optimizer"]["state"][0]  # Adam's moments, not SGD's momentum buffer
    bundle.export(tmp_path / "run", name="test-fungtion", out=tmp_path / "model", n_bootstrap=50)
    model, meta, _ = load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    assert meta["disc_bn"] is True
    x = load("demo-target:test", InputSpec.from_dict(meta["input_spec"])).images[:100]
    pred = Model.open(tmp_path / "model", device="cpu").predict(x)
    ref = torch_outputs(model, x)
    assert np.abs(pred.probabilities - ref["probabilities"]).max() <= 1e-4
    assert np.abs(pred.p_target - ref["p_target"]).max() <= 1e-4
