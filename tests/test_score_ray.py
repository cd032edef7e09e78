"""`adaptserve score --engine ray`: row-for-row the local scorer's output, a worker that dies mid-run, a tampered
model, a missing extra. One local Ray (2 CPUs) for the whole module; the tiny model of tests/test_service.py.
"""

import csv
import json
import sys

import numpy as np
import pytest
from PIL import Image

import adaptserve

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'adaptserve[ray]'")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(model, tmp_path_factory):
    """A labelled folder with a corrupt and an oversized file, an .npy, an .npz with labels (demo target)."""
    from adaptserve.service.preprocess import to_input_spec
    from adaptserve.train.data import demo_domain

    images, labels = demo_domain("target", "test")
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(images))[:460]
    x, y = to_input_spec(images[pick], model["runtime"].input_spec), labels[pick]
    root = tmp_path_factory.mktemp("ray-inputs")
    folder = root / "labelled"
    for i, (a, label) in enumerate(zip(x[:60], y[:60])):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / str(label) / f"{i:03d}.png")
    (folder / "3" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((5000, 5000), np.uint8)).save(folder / "3" / "huge.png")  # over --max-pixels below
    np.save(root / "x.npy", x)
    np.savez(root / "xy.npz", images=x, labels=y)
    return {"folder": folder, "npy": root / "x.npy", "npz": root / "xy.npz"}


def rows(path):
    if path.suffix == "":  # a parquet dataset folder
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        return list(csv.DictReader(path.open()))
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(a, b):
    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if k == "confidence" and ra[k] not in (None, ""):
                assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-6), (ra, rb)
            else:
                assert str(ra[k]) == str(rb[k]), (k, ra, rb)


def run(capsys, *args):
    code = adaptserve.main(["score", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name,suffix", [("folder", ".csv"), ("npy", ".jsonl"), ("npz", ".csv")])
def test_ray_rows_and_drift_report_equal_the_local_scorers(local_ray, model, inputs, tmp_path, capsys, name, suffix):
    local, remote = tmp_path / f"local{suffix}", tmp_path / f"ray{suffix}"
    extra = ["--max-pixels", "1000000"]
    code, _, err = run(capsys, model["folder"], inputs[name], "--out", local, *extra)
    assert code == 0, err
    code, out, err = run(capsys, model["folder"], inputs[name], "--out", remote, "--engine", "ray", "--workers", "2", *extra)
    assert code == 0, err
    assert_same_rows(rows(local), rows(remote))
    if name == "folder":
        errors = [r for r in rows(remote) if r["error"]]
        assert len(errors) == 2 and any("ADAPTSERVE_MAX_PIXELS" in r["error"] for r in errors), errors
        assert "accuracy" in out
    drift_local = json.loads((tmp_path / f"local{suffix}.drift.json").read_text())
    drift_ray = json.loads((tmp_path / f"ray{suffix}.drift.json").read_text())
    assert drift_ray["n_windows"] == drift_local["n_windows"] and drift_ray["n_windows"] >= (2 if name != "folder" else 0)
    for w_local, w_ray in zip(drift_local["windows"], drift_ray["windows"]):
        assert (w_local["start"], w_local["is_drift"]) == (w_ray["start"], w_ray["is_drift"])
        for t_local, t_ray in zip(w_local["tests"], w_ray["tests"]):
            assert t_ray["p_value"] == pytest.approx(t_local["p_value"], rel=1e-4, abs=1e-6), (t_local, t_ray)


def test_a_worker_that_dies_mid_run_loses_no_row_and_repeats_none(local_ray, model, inputs, tmp_path, monkeypatch,
                                                                   capsys):
    from adaptserve.service import score_ray

    marker = tmp_path / "crashed"
    monkeypatch.setenv(score_ray.CRASH_ONCE, str(marker))
    code, _, err = run(capsys, model["folder"], inputs["npz"], "--out", tmp_path / "ray.csv", "--engine", "ray",
                       "--batch-size", "64")
    assert code == 0, err
    assert marker.read_text() == "crashed"  # one actor did die on its first batch
    monkeypatch.delenv(score_ray.CRASH_ONCE)
    code, _, err = run(capsys, model["folder"], inputs["npz"], "--out", tmp_path / "local.csv", "--batch-size", "64")
    assert code == 0, err
    got = rows(tmp_path / "ray.csv")
    assert [int(r["index"]) for r in got] == list(range(460))  # every row exactly once, in order
    assert_same_rows(rows(tmp_path / "local.csv"), got)


def test_a_tampered_model_is_refused_before_any_row(local_ray, model, inputs, tmp_path, capsys):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(model["folder"], bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    out = tmp_path / "never.csv"
    code, _, err = run(capsys, bad, inputs["npy"], "--out", out, "--engine", "ray")
    assert code != 0 and "does not match its manifest" in err and not out.exists()


def test_without_the_ray_extra_the_error_is_one_line(model, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    code, _, err = run(capsys, model["folder"], inputs["npy"], "--out", tmp_path / "s.csv", "--engine", "ray")
    assert code == 2 and "pip install 'adaptserve[ray]'" in err and len(err.strip().splitlines()) == 1, err


def test_a_parquet_dataset_of_image_bytes_scores_like_the_folder(local_ray, model, inputs, tmp_path, capsys):
    """INPUT as object stores hold it: a parquet file of encoded images with path and label columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adaptserve.service.inputs import list_folder

    files, labels = list_folder(inputs["folder"], model["runtime"].classes)
    table = pa.table({"path": [str(p) for p in files], "image": [p.read_bytes() for p in files],
                      "label": [model["runtime"].classes[i] for i in labels]})  # class names, as a user would
    pq.write_table(table, tmp_path / "images.parquet")
    code, _, err = run(capsys, model["folder"], inputs["folder"], "--out", tmp_path / "local.jsonl", "--max-pixels", "1000000")
    assert code == 0, err
    code, _, err = run(capsys, model["folder"], f"file://{tmp_path / 'images.parquet'}", "--out", tmp_path / "ray.jsonl",
                       "--engine", "ray", "--max-pixels", "1000000")
    assert code == 0, err
    assert_same_rows(rows(tmp_path / "local.jsonl"), rows(tmp_path / "ray.jsonl"))


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_out_without_a_suffix_is_a_parquet_dataset_with_one_file_per_batch(local_ray, model, inputs, tmp_path, capsys,
                                                                          engine):
    code, _, err = run(capsys, model["folder"], inputs["npz"], "--out", tmp_path / "one.jsonl", "--batch-size", "100")
    assert code == 0, err
    out = tmp_path / "scores"
    code, _, err = run(capsys, model["folder"], inputs["npz"], "--out", out, "--engine", engine, "--batch-size", "100")
    assert code == 0, err
    parts = sorted(p.name for p in out.iterdir())
    assert parts[0] == "part-00000.parquet" and all(p.endswith(".parquet") for p in parts) and len(parts) >= 2
    assert_same_rows(rows(tmp_path / "one.jsonl"), rows(out))
    assert (tmp_path / "scores.drift.json").exists()
    code, _, err = run(capsys, model["folder"], inputs["npz"], "--out", out, "--engine", engine)
    assert code != 0 and "must be new or empty" in err  # never mixed with an earlier run's parts
