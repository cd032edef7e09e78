"""`adaptserve demo` end to end, shortened: every stage runs for real (train ×2 in parallel, export to the
session's BentoML store, score, `bentoml serve` on 127.0.0.1, requests) and the table reports each one."""

import re
import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_prints_the_table(cli, tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([*cli, "demo", "--out", str(out), "--steps", "100"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(1, 6):
        assert f"[{i}/5]" in r.stdout
    table = r.stdout[r.stdout.index("target accuracy"):]
    assert re.search(r"max \|Δp\| \d\.\de-\d\d on \d+ held-out images", table)
    assert re.search(r"batch scoring\s+2160 images, accuracy \d+\.\d%, \d+ drift windows", table)
    assert re.search(r"POST /classify, the same 8 PNGs 8/8 labels equal to /predict's", table)
    assert re.search(r"window of target\s+(OK|DRIFT) \(ks_discriminator p=", table)
    assert re.search(r"window of source\s+DRIFT \(", table), table  # the source domain is a real shift
    for f in ["source-only/summary.json", "dann/curves.png", "model/model.onnx", "scores.csv",
              "scores.csv.drift.json", "logs/serve.log"]:
        assert (out / f).is_file(), f


def test_demo_refuses_to_delete_a_folder_it_did_not_write(cli, tmp_path):
    precious = tmp_path / "dann" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("not a run")
    r = subprocess.run([*cli, "demo", "--out", str(tmp_path), "--steps", "100"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "is not a demo output" in r.stderr and "Traceback" not in r.stderr
    assert precious.read_text() == "not a run"
