"""`adaptserve score`: folders (with a corrupt file), .npy and .npz inputs, output formats, drift report.

Uses the tiny model of tests/test_service.py (trained and exported once per session).
"""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

import adaptserve

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def target(model):
    from adaptserve.service.preprocess import to_input_spec
    from adaptserve.train.data import demo_domain

    images, labels = demo_domain("target", "test")
    return to_input_spec(images[:450], model["runtime"].input_spec), labels[:450]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = adaptserve.main(["score", *map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_labelled_folder_with_a_corrupt_file(model, target, tmp_path, capsys):
    images, labels = target
    root = tmp_path / "imgs"
    paths = []
    for i in range(12):
        d = root / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:03d}.png"
        Image.fromarray(images[i]).save(p)
        paths.append(p)
    (root / str(labels[0]) / "broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "scores.csv"
    code, stdout, stderr = run_cli(capsys, model["tag"], root, "--out", out, "--batch-size", "5")
    assert code == 0, stderr
    assert "1 of 13 items could not be read" in stderr and "accuracy" in stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 13 and list(rows[0]) == ["path", "label", "class_index", "confidence", "true_label", "error"]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png") and "not a readable image" in bad[0]["error"]
    assert bad[0]["label"] == "" and bad[0]["true_label"] == str(labels[0])
    good = {r["path"]: r for r in rows if not r["error"]}
    pred = model["runtime"].predict(images[:12])
    for i, p in enumerate(paths):
        r = good[str(p)]
        assert int(r["class_index"]) == pred.predictions[i] and r["label"] == pred.labels[i]
        assert float(r["confidence"]) == pytest.approx(float(pred.probabilities[i].max()), abs=1e-6)
        assert r["true_label"] == str(labels[i])
    acc = np.mean(pred.predictions == labels[:12])
    assert f"accuracy {acc:.2%} on 12 labelled" in stdout
    report = json.loads((tmp_path / "scores.csv.drift.json").read_text())
    w = model["runtime"].drift_reference.window
    assert report["n_windows"] == 0 and report["n_images"] == 12 and f"fewer than {w}" in report["note"]


def test_npz_with_labels_to_jsonl_matches_the_runtime_and_reports_drift(model, target, tmp_path, capsys):
    images, labels = target
    npz = tmp_path / "t.npz"
    np.savez(npz, images=images, labels=labels)
    out = tmp_path / "sub" / "scores.jsonl"
    code, stdout, stderr = run_cli(capsys, model["folder"], npz, "--out", out, "--batch-size", "128")
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pred = model["runtime"].predict(images)
    assert [r["index"] for r in rows] == list(range(450))
    assert [r["class_index"] for r in rows] == pred.predictions.tolist()
    assert [r["label"] for r in rows] == pred.labels and all(r["error"] is None for r in rows)
    np.testing.assert_allclose([r["confidence"] for r in rows], pred.probabilities.max(1), atol=1e-6)
    assert f"accuracy {np.mean(pred.predictions == labels):.2%} on 450 labelled" in stdout

    report = json.loads((tmp_path / "sub" / "scores.jsonl.drift.json").read_text())
    ref = model["runtime"].drift_reference
    W, n = ref.window, 450 // ref.window  # the tiny model's 43: 10 windows and a tail of 20
    assert report["window_size"] == W and report["n_windows"] == n and report["n_untested_tail"] == 450 - n * W
    starts = [i * W for i in range(n)]
    assert [(w["start"], w["end"]) for w in report["windows"]] == [(s, s + W) for s in starts]
    expected = [ref.check(pred.p_target[s:s + W], pred.probabilities[s:s + W], pred.features[s:s + W])
                for s in starts]
    for w, e in zip(report["windows"], expected):
        assert w["is_drift"] == e["drift"]
        assert [t["name"] for t in w["tests"]] == ["ks_discriminator", "ks_softmax_bonferroni", "mmd_pca"]
        for t in w["tests"]:
            assert t["p_value"] == pytest.approx(e[t["name"]]["p_value"]) and t["is_drift"] == e[t["name"]]["alarm"]
        effects = {t["name"]: t for t in w["tests"]}
        assert effects["ks_discriminator"]["mean_p_target_shift"] == pytest.approx(e["ks_discriminator"]["mean_p_target_shift"])
        assert effects["ks_softmax_bonferroni"]["class_index"] == e["ks_softmax_bonferroni"]["class"]
    k = sum(e["drift"] for e in expected)  # in-distribution: P(Binomial(n, 0.01) ≥ k)
    assert report["fraction_windows_alarmed"] == k / n
    p_k = sum(math.comb(n, j) * 0.01 ** j * 0.99 ** (n - j) for j in range(k, n + 1))
    assert report["whole_set"]["p_value"] == pytest.approx(p_k) and report["whole_set"]["is_drift"] == (p_k <= 0.01)
    assert set(report["fraction_windows_alarmed_per_test"]) == {"ks_discriminator", "ks_softmax_bonferroni", "mmd_pca"}

    # --no-drift: the same rows, no discriminator, and the earlier report is removed rather than left stale
    code, stdout, stderr = run_cli(capsys, model["folder"], npz, "--out", out, "--batch-size", "128", "--no-drift")
    assert code == 0, stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not (tmp_path / "sub" / "scores.jsonl.drift.json").exists() and "no drift checks" in stdout


def test_npy_grey_images_and_inverted_images_alarm(model, target, tmp_path, capsys):
    images, _ = target
    npy = tmp_path / "inv.npy"
    W = model["runtime"].drift_reference.window
    np.save(npy, 255 - images[:2 * W])
    out = tmp_path / "inv.csv"
    code, stdout, stderr = run_cli(capsys, model["folder"], npy, "--out", out)
    assert code == 0, stderr
    assert "accuracy" not in stdout and "2 drift windows, 100% alarmed" in stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * W and list(rows[0]) == ["index", "label", "class_index", "confidence", "error"]
    report = json.loads((tmp_path / "inv.csv.drift.json").read_text())
    assert report["n_windows"] == 2 and report["fraction_windows_alarmed"] == 1.0
    assert report["whole_set"]["is_drift"] and report["whole_set"]["p_value"] == pytest.approx(0.01 ** 2)

    grey = tmp_path / "grey.npy"
    np.save(grey, np.zeros((3, 28, 28), np.uint8))  # (N,H,W) grey, other size → input spec
    code, _, stderr = run_cli(capsys, model["folder"], grey, "--out", tmp_path / "g.jsonl")
    assert code == 0, stderr
    said = "28×28×1 → 32×32×3 (grey repeated to 3 channels, zero-padded, centred)"
    assert stderr.count(said) == 1, stderr  # the conversion, said once
    assert json.loads((tmp_path / "g.jsonl.drift.json").read_text())["input_conversion"] == said
    assert report["input_conversion"] is None and "converted" not in run_cli(capsys, model["folder"], npy, "--out", out)[2]
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["class_index"] for r in rows] == model["runtime"].predict(np.zeros((3, 28, 28, 1), np.uint8)).predictions.tolist()


def test_bad_items_in_an_array_are_reported_not_fatal(model, tmp_path, capsys):
    a = np.zeros((4, 32, 32, 3), np.float32)
    a[2] = 7.0  # out of [0, 1]
    np.save(tmp_path / "f.npy", a)
    code, _, stderr = run_cli(capsys, model["folder"], tmp_path / "f.npy", "--out", tmp_path / "f.jsonl")
    assert code == 0 and "1 of 4 items could not be read" in stderr
    rows = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["error"] is not None for r in rows] == [False, False, True, False] and "[0, 1]" in rows[2]["error"]


def test_output_formats_and_errors(model, target, tmp_path, capsys):
    images, labels = target
    import pyarrow.parquet as pq  # a dependency: --out .parquet must work

    np.savez(tmp_path / "t.npz", images=images[:20], labels=labels[:20])
    code, _, stderr = run_cli(capsys, model["folder"], tmp_path / "t.npz", "--out", tmp_path / "s.parquet",
                              "--batch-size", "8")  # 3 batches → 3 row groups in one file
    assert code == 0, stderr
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == ["index", "label", "class_index", "confidence", "true_label", "error"]
    assert str(table.schema.field("class_index").type) == "int64" and str(table.schema.field("error").type) == "string"
    t = table.to_pylist()
    pred = model["runtime"].predict(images[:20])
    assert [r["index"] for r in t] == list(range(20)) and [r["label"] for r in t] == pred.labels
    assert [r["class_index"] for r in t] == pred.predictions.tolist()
    np.testing.assert_allclose([r["confidence"] for r in t], pred.probabilities.max(1), atol=1e-6)
    assert [r["true_label"] for r in t] == [str(x) for x in labels[:20]] and all(r["error"] is None for r in t)
    bad = np.zeros((3, 32, 32, 3), np.float32)
    bad[1] = 2.0  # out of [0, 1]: an error row with empty prediction columns
    np.save(tmp_path / "bad.npy", bad)
    code, _, stderr = run_cli(capsys, model["folder"], tmp_path / "bad.npy", "--out", tmp_path / "bad.parquet")
    assert code == 0, stderr
    t = pq.read_table(tmp_path / "bad.parquet").to_pylist()
    assert [r["class_index"] is None for r in t] == [False, True, False] and "[0, 1]" in t[1]["error"]

    for args, message in [([tmp_path / "t.npz", "--out", tmp_path / "s.txt"], "suffix"),
                          ([tmp_path / "missing.npz", "--out", tmp_path / "s.csv"], "does not exist"),
                          ([tmp_path / "t.npz", "--out", tmp_path / "s.csv", "--batch-size", "0"], "at least 1")]:
        code, _, stderr = run_cli(capsys, model["folder"], *args)
        assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    (tmp_path / "broken.npz").write_bytes(b"PK not a zip")
    code, _, stderr = run_cli(capsys, model["folder"], tmp_path / "broken.npz", "--out", tmp_path / "s.csv")
    assert code == 2 and "not a readable .npz" in stderr
    code, _, stderr = run_cli(capsys, "no-such-model:latest", tmp_path / "t.npz", "--out", tmp_path / "s.csv")
    assert code == 2 and "no model" in stderr


class _FakeReference:
    """A DriftReference stand-in with W = 3: a window alarms when its first score is ≥ 6, raises when < 0."""

    window, alpha, alpha_per_test = 3, 0.01, 0.01 / 3

    from adaptserve.service.drift import DriftReference

    tests = DriftReference.tests  # formats a check's result (uses alpha_per_test only)

    def check(self, p_target, probabilities, features, projected=False):
        if p_target[0] < 0:
            raise ValueError("check failed")
        alarm = bool(p_target[0] >= 6)
        r = {"statistic": float(p_target[0]), "p_value": 0.0 if alarm else 1.0, "alarm": alarm}
        return {"ks_discriminator": r, "ks_softmax_bonferroni": r, "mmd_pca": {**r, "threshold": 5.0}, "drift": alarm}


def test_window_drift_on_its_worker_thread_keeps_order_and_raises_check_errors():
    from adaptserve.service.score import WindowDrift

    def feed(drift, values, sizes):
        values, i = np.asarray(values, np.float32), 0
        for n in sizes:  # batches that do not line up with the windows
            drift.add(values[i:i + n], np.zeros((n, 2)), np.zeros((n, 4)))
            i += n

    drift = WindowDrift(_FakeReference())
    feed(drift, range(10), [2, 5, 1, 2])
    report = drift.report("m", 10)
    assert [(w["start"], w["end"], w["is_drift"]) for w in report["windows"]] == [(0, 3, False), (3, 6, False), (6, 9, True)]
    assert [w["tests"][0]["statistic"] for w in report["windows"]] == [0.0, 3.0, 6.0]
    assert report["n_untested_tail"] == 1 and report["n_windows_alarmed"] == 1
    assert report["whole_set"]["p_value"] == pytest.approx(1 - 0.99 ** 3) and not report["whole_set"]["is_drift"]

    drift = WindowDrift(_FakeReference())  # a failing check surfaces in report() ...
    feed(drift, [0, 1, 2, -1, 0, 0], [3, 3])
    with pytest.raises(ValueError, match="check failed"):
        drift.report("m", 6)
    drift.shutdown()
    drift = WindowDrift(_FakeReference())  # ... or in add(), once more than MAX_PENDING windows wait
    with pytest.raises(ValueError, match="check failed"):
        feed(drift, [-1, 0, 0] + [0] * 3 * WindowDrift.MAX_PENDING, [3] * (WindowDrift.MAX_PENDING + 1))
    drift.shutdown()


def test_image_files_over_the_pixel_limit_are_error_rows_not_decoded(model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((12000, 12000), np.uint8)).save(folder / "huge.png")  # 144 Mpx, ~140 KB
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "small.png")
    code, _, stderr = run_cli(capsys, model["folder"], folder, "--out", tmp_path / "p.csv", "--no-drift")
    assert code == 0 and "1 of 2 items could not be read" in stderr, stderr
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader((tmp_path / "p.csv").open())}
    assert "ADAPTSERVE_MAX_PIXELS" in rows["huge.png"]["error"] and rows["small.png"]["error"] == ""
    code, _, stderr = run_cli(capsys, model["folder"], folder, "--out", tmp_path / "q.csv", "--no-drift",
                              "--max-pixels", "1000")  # 40×40 = 1,600 pixels: over this limit too
    assert code == 0 and "2 of 2 items could not be read" in stderr, stderr
