"""Dataset specs, loaders, the shared preprocessing and their errors."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from adaptserve.service.preprocess import ImageError, InputSpec, as_uint8_nhwc, to_input_spec
from adaptserve.train.data import DataError, demo_domain, holdout_split, load, parse_spec

DIGITS32 = InputSpec(32, 32, 3)
SHARED = Path(os.environ.get("ADAPTSERVE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_parse_spec():
    assert parse_spec("mnist") == ("mnist", "train")
    assert parse_spec("mnist", "test") == ("mnist", "test")
    assert parse_spec("usps:test") == ("usps", "test")
    assert parse_spec("folder:/a/b:c") == ("folder", "/a/b:c")
    with pytest.raises(DataError, match="unknown dataset spec 'imagenet'"):
        parse_spec("imagenet")
    with pytest.raises(DataError, match="unknown split"):
        parse_spec("mnist:val")
    with pytest.raises(DataError, match="needs a path"):
        parse_spec("folder:")


def test_to_input_spec_pads_small_grey_and_resizes_large():
    grey = np.zeros((2, 28, 28), np.uint8)
    grey[:, 10, 12] = 200
    out = to_input_spec(grey, DIGITS32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    assert (out[:, 12, 14] == 200).all() and out.sum() == 2 * 3 * 200  # centred by 2 px, nothing else changed
    usps = np.full((1, 16, 16), 255, np.uint8)
    assert to_input_spec(usps, InputSpec(28, 28, 1)).shape == (1, 28, 28, 1)  # resized, not padded
    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    g = to_input_spec(rgb, InputSpec(8, 8, 1))
    assert g.shape == (1, 8, 8, 1) and int(g[0, 0, 0, 0]) == 76  # 0.299 · 255
    rgba = np.zeros((40, 40, 4), np.uint8)  # one RGBA image, larger than the spec
    assert to_input_spec(rgba, DIGITS32).shape == (1, 32, 32, 3)


def test_to_input_spec_rejects_bad_arrays():
    with pytest.raises(ImageError, match="\\[0, 1\\]"):
        as_uint8_nhwc(np.full((1, 4, 4), 3.0))
    with pytest.raises(ImageError, match="\\[0, 255\\]"):
        as_uint8_nhwc(np.full((1, 4, 4), 300))
    with pytest.raises(ImageError, match="channels"):
        as_uint8_nhwc(np.zeros((2, 4, 4, 7), np.uint8))
    with pytest.raises(ImageError, match="rank"):
        as_uint8_nhwc(np.zeros((2, 2, 4, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="dtype"):
        as_uint8_nhwc(np.array([["a"]]))


def test_demo_pair_is_deterministic_and_shifted():
    s1, ys = demo_domain("source", "train")
    s2, _ = demo_domain("source", "train")
    t, yt = demo_domain("target", "train")
    tt, ytt = demo_domain("target", "test")
    assert np.array_equal(s1, s2)
    assert s1.shape[1:] == (28, 28) and t.shape[1:] == (32, 32, 3)
    assert len(ys) == len(s1) and len(yt) == len(t) and set(np.unique(ytt)) == set(range(10))
    assert len(tt) < len(t)
    assert abs(float(s1.mean()) - float(t.mean())) > 20  # a real shift: black digits vs textured colour


def test_holdout_split_is_fixed_and_disjoint():
    a, b = holdout_split(1000, 0.1)
    a2, b2 = holdout_split(1000, 0.1)
    assert np.array_equal(b, b2) and len(b) == 100 and len(a) == 900
    assert not set(a) & set(b)


def test_missing_data_dir_and_files_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTSERVE_DATA", raising=False)
    with pytest.raises(DataError, match="ADAPTSERVE_DATA"):
        load("mnist", DIGITS32)
    with pytest.raises(DataError, match=r"missing data file .*mnist_m_train_labels.npy|mnist_m_train_images"):
        load("mnist_m", DIGITS32, data_root=tmp_path)
    with pytest.raises(DataError, match=r"missing data file .*usps.h5[\s\S]*expected layout"):
        load("usps", DIGITS32, data_root=tmp_path)
    with pytest.raises(DataError, match=r"test_32x32.mat"):
        load("svhn:test", DIGITS32, data_root=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load("mnist", DIGITS32, data_root=tmp_path / "nope")


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    (tmp_path / "mnist").mkdir()
    header = (2051).to_bytes(4, "big") + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\0" * 100))
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 8))
    with pytest.raises(DataError, match="truncated"):
        load("mnist", DIGITS32, data_root=tmp_path)


def _png(path: Path, value: int, size=(20, 20)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def test_folder_labelled_and_unlabelled(tmp_path):
    for cls, v in [("cat", 10), ("dog", 200)]:
        for i in range(3):
            _png(tmp_path / "src" / cls / f"{i}.png", v)
    ds = load(f"folder:{tmp_path / 'src'}", DIGITS32)
    assert ds.classes == ["cat", "dog"] and ds.images.shape == (6, 32, 32, 3)
    assert list(ds.labels) == [0, 0, 0, 1, 1, 1]
    _png(tmp_path / "tgt" / "a.png", 5, (50, 40))
    _png(tmp_path / "tgt" / "deep" / "b.png", 5)
    tgt = load(f"folder:{tmp_path / 'tgt'}", DIGITS32, classes=ds.classes)
    assert tgt.labels is None and len(tgt) == 2
    # an unlabelled target organised in sub-folders that are not classes (e.g. by camera or date)
    for sub in ["cam1", "cam2"]:
        _png(tmp_path / "cams" / sub / "0.png", 7)
    with pytest.raises(DataError, match="cam1"):  # as an eval set it needs labels: refused
        load(f"folder:{tmp_path / 'cams'}", DIGITS32, classes=ds.classes)
    cams = load(f"folder:{tmp_path / 'cams'}", DIGITS32, classes=ds.classes, labels_optional=True)
    assert cams.labels is None and len(cams) == 2 and cams.classes == ds.classes
    part = load(f"folder:{tmp_path / 'src'}", DIGITS32, classes=ds.classes, labels_optional=True)
    assert list(part.labels) == [0, 0, 0, 1, 1, 1]  # a target whose folders are classes keeps its labels


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(f"folder:{tmp_path / 'none'}", DIGITS32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load(f"folder:{tmp_path / 'empty'}", DIGITS32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"bad image .*broken.png"):
        load(f"folder:{tmp_path / 'bad'}", DIGITS32)
    for cls in ["cat", "zebra"]:
        _png(tmp_path / "tl" / cls / "0.png", 1)
    with pytest.raises(DataError, match="zebra"):
        load(f"folder:{tmp_path / 'tl'}", DIGITS32, classes=["cat", "dog"])


def test_npz(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([0, 1, 2, 1]))
    ds = load(f"npz:{tmp_path / 'd.npz'}", DIGITS32)
    assert ds.images.shape == (4, 32, 32, 3) and list(ds.labels) == [0, 1, 2, 1]
    np.savez(tmp_path / "x.npz", pictures=np.zeros(3))
    with pytest.raises(DataError, match="no array 'images'"):
        load(f"npz:{tmp_path / 'x.npz'}", DIGITS32)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable"):
        load(f"npz:{tmp_path / 'junk.npz'}", DIGITS32)


@pytest.mark.skipif(not (SHARED / "usps").is_dir(), reason="shared data not present (set ADAPTSERVE_DATA)")
def test_real_datasets_load_with_documented_shapes():
    m = load("mnist:test", DIGITS32, data_root=SHARED)
    assert m.images.shape == (10000, 32, 32, 3) and np.bincount(m.labels)[1] == 1135
    u = load("usps:test", InputSpec(28, 28, 1), data_root=SHARED)
    assert u.images.shape == (2007, 28, 28, 1) and np.bincount(u.labels)[0] == 359
    mm = load("mnist_m:test", DIGITS32, data_root=SHARED)
    assert mm.images.shape == (9001, 32, 32, 3) and np.array_equal(mm.labels, m.labels[:9001])


def test_holdout_keeps_copies_of_one_digit_together():
    ds = load("demo-target", DIGITS32)
    train_idx, held = holdout_split(len(ds), 0.1, groups=ds.groups)
    assert set(ds.groups[train_idx]).isdisjoint(ds.groups[held])  # no held-out image is a copy of a training one
    assert 0.08 < len(held) / len(ds) < 0.12
    assert np.array_equal(holdout_split(50, 0.2)[1], holdout_split(50, 0.2, groups=np.arange(50))[1])


def test_syn_rendered_digits_are_deterministic_balanced_and_legible(tmp_path):
    """train.syn: the same seed gives the same pixels; every class; the digit stands out from its background."""
    from adaptserve.train import syn

    patches = syn.bsds500_patches(tmp_path)  # no bsds500 here → flat and gradient backgrounds
    assert patches is None
    a, la = syn.render(60, seed=7)
    b, lb = syn.render(60, seed=7)
    c, _ = syn.render(60, seed=8)
    assert a.shape == (60, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert np.bincount(la, minlength=10).tolist() == [6] * 10
    spread = a.reshape(60, -1, 3).astype(float).std(1).max(1)
    assert (spread > 10).all(), spread  # never a blank image: the ink differs from the background
    assert len(syn.font_paths()) >= 10


@pytest.mark.slow
def test_syn_spec_loads_both_splits_with_bsds500_backgrounds_and_caches_them(tmp_path, monkeypatch):
    from adaptserve.train import syn
    from adaptserve.train.data import load

    monkeypatch.setenv("ADAPTSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(syn, "SPLITS", {"train": (300, 1), "test": (100, 2)})  # the real sizes: 25k / 9k
    data = os.environ.get("ADAPTSERVE_DATA")
    train = load("syn", InputSpec(32, 32, 3), data_root=data)
    test = load("syn:test", InputSpec(28, 28, 3), data_root=data)
    assert len(train) == 300 and len(test) == 100 and set(train.labels.tolist()) == set(range(10))
    assert test.images.shape[1:] == (28, 28, 3)
    kind = "bsds500" if data and (Path(data) / "bsds500" / "bsds500_train.tar").is_file() else "plain"
    assert (tmp_path / f"syn-v{syn.VERSION}-train-{kind}.npz").is_file()
    again = load("syn", InputSpec(32, 32, 3), data_root=data)  # from the cache, the same images
    assert np.array_equal(again.images, train.images)
