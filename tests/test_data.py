"""Tests for recipes.data: offline Fashion-MNIST, synthetic_shapes, batching, label splits."""
import hashlib
import pathlib

import numpy as np
import pytest

from recipes import data

FMNIST_PRESENT = all(
    (data.FASHION_MNIST_SOURCE_DIR / f).is_file()
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
)
needs_fmnist = pytest.mark.skipif(
    not FMNIST_PRESENT,
    reason=f"Debian package dataset-fashion-mnist not installed ({data.FASHION_MNIST_SOURCE_DIR} "
    f"missing); {data.INSTALL_HINT}",
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fresh TFDS data_dir: everything is prepared from scratch, offline."""
    return tmp_path_factory.mktemp("tfds")


# ------------------------------------------------------------------ offline Fashion-MNIST
@needs_fmnist
def test_restored_gzip_matches_tfds_checksum(tmp_path):
    infos = data.fashion_mnist_url_infos()
    assert sorted(infos) == sorted(
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    )
    manual = data.restore_fashion_mnist(tmp_path / "manual")
    for name, expected in infos.items():
        blob = (manual / name).read_bytes()
        # The Debian file alone does not match: the header restore is what makes it pass.
        assert hashlib.sha256((data.FASHION_MNIST_SOURCE_DIR / name).read_bytes()).hexdigest() != expected.checksum
        assert hashlib.sha256(blob).hexdigest() == expected.checksum, name
        assert len(blob) == int(expected.size)
        assert blob[3] & 0x08 and blob[10:10 + len(name) - 2] == name[:-3].encode() + b"\0"


@needs_fmnist
def test_fashion_mnist_test_split_offline_from_scratch(data_dir, no_network):
    images, labels = data.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() > 200 and images.min() == 0
    # the fixed copies live in the manual dir under the data_dir; nothing else was fetched
    assert (pathlib.Path(data_dir) / "manual" / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    sub_images, _ = data.load_arrays("fashion_mnist", "test[:10%]", data_dir=data_dir)
    np.testing.assert_array_equal(sub_images, images[:1000])
    i = data.info("fashion_mnist")
    assert i.image_shape == (28, 28, 1) and i.num_classes == 10 and len(i.class_names) == 10
    assert i.splits == {"train": 60000, "test": 10000}


def test_missing_debian_package_raises_with_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SOURCE_DIR", tmp_path / "does-not-exist")
    with pytest.raises(data.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_arrays("fashion_mnist", "test", data_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "fashion_mnist" / "3.0.1").exists()


def test_downloads_are_refused():
    import tensorflow_datasets as tfds

    with data._no_downloads():
        dm = tfds.download.DownloadManager(download_dir="/nonexistent-never-used")
        with pytest.raises(data.OfflineDownloadError, match="never downloads"):
            dm.download("http://example.invalid/file.gz")


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist, synthetic_shapes"):
        data.load_arrays("cifar10", data_dir=tmp_path)
    with pytest.raises(ValueError, match="valid names"):
        data.info("mnist")


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/some/where")
    assert data.default_data_dir() == "/some/where"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.default_data_dir() == str(pathlib.Path.home() / "tensorflow_datasets")


# ------------------------------------------------------------------ synthetic_shapes
def test_synthetic_shapes_builds_and_is_deterministic(data_dir, tmp_path):
    images, labels = data.load_arrays("synthetic_shapes", "train", data_dir=data_dir)
    i = data.info("synthetic_shapes")
    assert images.shape == (i.splits["train"],) + i.image_shape and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(i.num_classes))
    assert 5 <= i.num_classes <= 10 and len(i.class_names) == i.num_classes
    test_images, test_labels = data.load_arrays("synthetic_shapes", "test", data_dir=data_dir)
    assert test_images.shape == (i.splits["test"],) + i.image_shape
    assert set(np.unique(test_labels)) == set(range(i.num_classes))
    # a second, independent build gives the same bytes in the same order
    images2, labels2 = data.load_arrays("synthetic_shapes", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(images, images2)
    np.testing.assert_array_equal(labels, labels2)
    # train and test differ; images are not constant
    assert not np.array_equal(images[: len(test_images)], test_images)
    assert images.std() > 20


def test_synthetic_shapes_is_a_registered_tfds_builder(data_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder("synthetic_shapes", data_dir=data_dir)
    assert isinstance(builder, data.SyntheticShapes)
    assert str(builder.version) == "1.0.0"
    assert builder.info.features["label"].names == list(data.info("synthetic_shapes").class_names)


# ------------------------------------------------------------------ make_dataset
def _toy(n=50):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 5, n).astype(np.int64)


def test_make_dataset_structure_and_index():
    images, labels = _toy()
    ds = data.make_dataset(images, labels, batch_size=8, with_index=True, seed=3)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 50 // 8
    seen = []
    for b in batches:
        assert set(b) == {"image", "label", "index"}
        assert b["image"].shape == (8, 4, 4, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int64 and b["index"].dtype == np.int64
        np.testing.assert_array_equal(images[b["index"]], b["image"])
        np.testing.assert_array_equal(labels[b["index"]], b["label"])
        seen.extend(b["index"])
    assert len(set(seen)) == len(seen)  # no repeats within an epoch
    assert seen != sorted(seen)  # shuffled


def test_make_dataset_optional_keys_and_no_shuffle():
    images, _ = _toy(10)
    b = next(iter(data.make_dataset(images, batch_size=4, shuffle=False)))
    assert set(b) == {"image"}
    np.testing.assert_array_equal(b["image"].numpy(), images[:4])
    last = list(data.make_dataset(images, batch_size=4, shuffle=False, drop_remainder=False))
    assert [x["image"].shape[0] for x in last] == [4, 4, 2]


def test_make_dataset_deterministic_for_seed():
    images, labels = _toy()

    def order(seed):
        ds = data.make_dataset(images, labels, batch_size=10, seed=seed, with_index=True, repeat=True)
        return np.concatenate([b["index"] for b in ds.take(12).as_numpy_iterator()])

    a = order(7)
    np.testing.assert_array_equal(a, order(7))
    assert not np.array_equal(a, order(8))
    assert len(a) == 120  # repeat runs past one epoch
    assert not np.array_equal(a[:50], a[50:100])  # reshuffled each epoch


def test_make_dataset_errors():
    images, labels = _toy(5)
    with pytest.raises(ValueError, match="uint8"):
        data.make_dataset(images.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        data.make_dataset(images, labels[:3])
    with pytest.raises(ValueError, match="no batch"):
        data.make_dataset(images, batch_size=8)


# ------------------------------------------------------------------ split_labelled
LABELS = np.repeat(np.arange(4), [10, 20, 30, 40])


def _check_partition(lab, unl, n):
    assert lab.dtype == np.int64 and unl.dtype == np.int64
    assert not set(lab) & set(unl)
    np.testing.assert_array_equal(np.sort(np.concatenate([lab, unl])), np.arange(n))


def test_split_per_class_exact():
    lab, unl = data.split_labelled(LABELS, per_class=3, seed=1)
    _check_partition(lab, unl, len(LABELS))
    np.testing.assert_array_equal(np.bincount(LABELS[lab]), [3, 3, 3, 3])


def test_split_fraction_stratified():
    lab, unl = data.split_labelled(LABELS, fraction=0.1, seed=1)
    _check_partition(lab, unl, len(LABELS))
    np.testing.assert_array_equal(np.bincount(LABELS[lab]), [1, 2, 3, 4])
    tiny, _ = data.split_labelled(LABELS, fraction=0.01)
    np.testing.assert_array_equal(np.bincount(LABELS[tiny]), [1, 1, 1, 1])  # at least 1 per class
    full, none = data.split_labelled(LABELS, fraction=1.0)
    assert len(full) == len(LABELS) and len(none) == 0


def test_split_deterministic():
    a = data.split_labelled(LABELS, fraction=0.3, seed=5)
    b = data.split_labelled(LABELS, fraction=0.3, seed=5)
    c = data.split_labelled(LABELS, fraction=0.3, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"fraction": 0.5, "per_class": 2}, "exactly one"),
        ({"fraction": 0.0}, r"\(0, 1\]"),
        ({"fraction": 1.5}, r"\(0, 1\]"),
        ({"per_class": 0}, "positive"),
        ({"per_class": 11}, "larger than some classes"),
    ],
)
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.split_labelled(LABELS, **kwargs)


def test_two_jobs_preparing_one_fresh_data_dir_both_succeed(tmp_path):
    """Jobs started together on a fresh machine share the TFDS dir: one generates, the other waits."""
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from recipes import data\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
        "images, labels = data.load_arrays('synthetic_shapes', 'test', data_dir=sys.argv[2])\n"
        "print(images.shape[0])\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    jobs = [subprocess.Popen([sys.executable, "-c", script, str(go), str(tmp_path / "tfds")], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(8)  # both have imported TensorFlow and wait at the start line
    go.touch()
    outputs = [job.communicate(timeout=300) for job in jobs]
    for job, (out, err) in zip(jobs, outputs):
        assert job.returncode == 0, err[-2000:]
        assert out.split()[-1] == str(data.info("synthetic_shapes").splits["test"])
