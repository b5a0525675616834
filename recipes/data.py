"""Datasets for the recipes: TFDS Fashion-MNIST (offline), a synthetic TFDS builder, label splits.

Offline Fashion-MNIST: this machine has no network, so we take the four files from Debian's
`dataset-fashion-mnist` package, whose gzip headers lack the upstream FNAME field and mtime;
restoring those header bytes makes them byte-identical to upstream, so TFDS's own
`fashion_mnist` builder accepts them from its `manual_dir` with its registered sha256 checksums.

Everything here is offline: TFDS is never allowed to download (a download attempt raises
`OfflineDownloadError`), and GCS is never tried.

Your own images: `folder:ROOT` (a split folder per split, a class folder per class; see
`recipes.image_folder`) works wherever a dataset name does in `info` and `load_arrays`.

Public API: `DATASETS`, `default_data_dir`, `load_arrays`, `info`, `make_dataset`,
`split_labelled`, plus `prepare` and the `SyntheticShapes` builder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import importlib.resources
import importlib.resources.abc  # noqa: F401  (makes `.abc` an attribute for the shim below)
import os
import pathlib
import sys
import tempfile
import shutil
from typing import Iterator

import numpy as np

# tensorflow-datasets 4.9.10 lazily imports the `importlib_resources` backport (only in
# `DatasetBuilder.code_path`, for `importlib_resources.abc.Traversable`), but since etils 1.15
# nothing installs it. The standard library module has the same API on Python >= 3.9.
try:  # pragma: no cover - depends on the environment
    importlib.import_module("importlib_resources")
except ImportError:  # pragma: no cover
    sys.modules["importlib_resources"] = importlib.resources

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.core.download import checksums as _tfds_checksums  # noqa: E402
from tensorflow_datasets.core.download import download_manager as _tfds_dm  # noqa: E402

from recipes import image_folder  # noqa: E402

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetChecksumError",
    "OfflineDownloadError",
    "SyntheticShapes",
    "default_data_dir",
    "info",
    "load_arrays",
    "make_dataset",
    "prepare",
    "restore_gzip_header",
    "split_labelled",
]

DATASETS = ("fashion_mnist", "synthetic_shapes")

# Where Debian's `dataset-fashion-mnist` puts the files (tests monkeypatch this).
FASHION_MNIST_SOURCE_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist (or ./run setup)"

# Upstream gzip mtimes, by file-name prefix.
_UPSTREAM_MTIME = {"train": 0x59A7E9DE, "t10k": 0x59A7E9F3}
_GZIP_FNAME = 0x08
_GZIP_OTHER_FLAGS = 0x02 | 0x04 | 0x10  # FHCRC, FEXTRA, FCOMMENT


class DatasetNotFoundError(Exception):
    """The source files of a dataset are not on this machine (and nothing is ever downloaded)."""


class DatasetChecksumError(Exception):
    """A restored source file does not match the checksum TFDS recorded for it."""


class OfflineDownloadError(RuntimeError):
    """TFDS tried to download something; this project never downloads."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a recipe needs to know about a dataset without reading it."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    splits: dict[str, int]


def default_data_dir() -> str:
    """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets`."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, "
                         "or folder:/path/to/images for your own (recipes.image_folder)")


def _check_folder_options(name: str, image_size, channels) -> None:
    if (image_size is not None or channels is not None) and not image_folder.is_folder_dataset(name):
        raise ValueError(f"--image_size and --channels apply to folder datasets (--dataset=folder:PATH); "
                         f"{name} has a fixed shape.")


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Makes any TFDS download attempt raise `OfflineDownloadError` instead of fetching."""

    def _refuse(self, resource):  # signature of DownloadManager._download
        raise OfflineDownloadError(
            f"TFDS tried to download {resource.url}; this project never downloads (no network "
            "here). The file should have come from the manual dir "
            f"{getattr(self, '_manual_dir', None)}."
        )

    original = _tfds_dm.DownloadManager._download
    _tfds_dm.DownloadManager._download = _refuse
    try:
        yield
    finally:
        _tfds_dm.DownloadManager._download = original


def _download_config(manual_dir=None, extract_dir=None) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        extract_dir=extract_dir,
        try_download_gcs=False,
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )


# --------------------------------------------------------------------------------------------
# Offline Fashion-MNIST
# --------------------------------------------------------------------------------------------
def restore_gzip_header(src, dst, fname: str, mtime: int) -> pathlib.Path:
    """Writes `src` (a gzip file without FNAME/mtime) to `dst` with FNAME=`fname`, MTIME=`mtime`.

    Only the 10-byte fixed header changes and the NUL-terminated name is inserted after it; the
    compressed stream and trailer are copied unchanged. Written atomically (tmp file + rename).
    """
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    data = src.read_bytes()
    if len(data) < 18 or data[:3] != b"\x1f\x8b\x08":
        raise DatasetChecksumError(f"{src} is not a gzip (deflate) file")
    flg = data[3]
    if flg & (_GZIP_FNAME | _GZIP_OTHER_FLAGS):
        raise DatasetChecksumError(
            f"{src}: unexpected gzip header flags 0x{flg:02x} (expected none: Debian's stripped "
            "header). Reinstall the package: " + INSTALL_HINT
        )
    header = (
        data[:3]
        + bytes([flg | _GZIP_FNAME])
        + int(mtime).to_bytes(4, "little")
        + data[8:10]  # XFL, OS unchanged
        + fname.encode("latin-1")
        + b"\x00"
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.write_bytes(header + data[10:])
    tmp.replace(dst)
    return dst


def fashion_mnist_url_infos() -> dict[str, "_tfds_checksums.UrlInfo"]:
    """TFDS's recorded size/sha256/filename for each Fashion-MNIST file, keyed by file name."""
    infos = tfds.builder_cls("fashion_mnist").url_infos or {}
    out = {info.filename: info for info in infos.values()}
    if len(out) != 4:
        raise RuntimeError(f"TFDS's fashion_mnist checksums look wrong: {sorted(out)}")
    return out


def _fashion_mnist_manual_dir(data_dir) -> pathlib.Path:
    return pathlib.Path(data_dir) / "manual" / "fashion_mnist"


def restore_fashion_mnist(manual_dir) -> pathlib.Path:
    """Restores the four Debian files into `manual_dir`, verified against TFDS's checksums.

    Raises DatasetNotFoundError when the Debian package is missing, DatasetChecksumError when a
    restored file does not match the recorded checksum.
    """
    manual_dir = pathlib.Path(manual_dir)
    infos = fashion_mnist_url_infos()
    src_dir = pathlib.Path(FASHION_MNIST_SOURCE_DIR)
    missing = [f for f in sorted(infos) if not (src_dir / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST source files not found in {src_dir} (missing: {', '.join(missing)}). "
            "Nothing is downloaded here (no network); install Debian's package: " + INSTALL_HINT
        )
    for filename, expected in sorted(infos.items()):
        dst = manual_dir / filename
        if dst.is_file() and _tfds_checksums.compute_url_info(dst) == expected:
            continue
        prefix = filename.split("-", 1)[0]
        restore_gzip_header(src_dir / filename, dst, filename[: -len(".gz")], _UPSTREAM_MTIME[prefix])
        got = _tfds_checksums.compute_url_info(dst)
        if got != expected:
            dst.unlink(missing_ok=True)
            raise DatasetChecksumError(
                f"Restored {filename} does not match TFDS's checksum: expected size "
                f"{int(expected.size)} sha256 {expected.checksum}, got size {int(got.size)} sha256 "
                f"{got.checksum}. The Debian package may be a different release; reinstall: "
                + INSTALL_HINT
            )
    return manual_dir


def _prepare_fashion_mnist(builder) -> None:
    manual_dir = restore_fashion_mnist(_fashion_mnist_manual_dir(builder.data_dir_root))
    # Downloads are not kept: the gz files are in manual_dir; extraction goes to a tmp dir.
    tmp = tempfile.mkdtemp(prefix="fmnist_extract_", dir=builder.data_dir_root)
    try:
        with _no_downloads():
            builder.download_and_prepare(
                download_dir=os.path.join(tmp, "downloads"),
                download_config=_download_config(manual_dir, os.path.join(tmp, "extracted")),
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# synthetic_shapes: a real TFDS builder, generated with numpy
# --------------------------------------------------------------------------------------------
SHAPE_NAMES = ("circle", "ring", "square", "frame", "triangle", "cross", "diamond", "x")
_SYNTH_SIZE = 32
_SYNTH_SPLITS = {"train": 2000, "test": 500}
_SYNTH_SEEDS = {"train": 1234, "test": 5678}


def _shape_mask(kind: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of shape `kind` of radius `r` on coordinates relative to its centre."""
    name = SHAPE_NAMES[kind]
    d2 = dx * dx + dy * dy
    cheb = np.maximum(np.abs(dx), np.abs(dy))
    if name == "circle":
        return d2 <= r * r
    if name == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if name == "square":
        return cheb <= 0.8 * r
    if name == "frame":
        return (cheb <= 0.8 * r) & (cheb >= 0.45 * r)
    if name == "triangle":  # apex up; y grows downwards
        h = 0.85 * r
        t = (dy + h) / (2 * h)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h * 1.1)
    if name == "cross":
        w = 0.3 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if name == "x":
        u, v = (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    raise AssertionError(name)


def generate_shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images [n,32,32,3] uint8 and labels [n] int64, a pure function of (n, seed).

    Labels cycle through the classes (balanced) in a seeded random order. Each image: a noisy
    random-colour background (with a random linear gradient), one shape of random colour, size
    and position. Colour and position carry no class information; only the shape does.
    """
    rng = np.random.default_rng(seed)
    k = len(SHAPE_NAMES)
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    s = _SYNTH_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    images = np.empty((n, s, s, 3), np.uint8)
    for i in range(n):
        bg = rng.uniform(0, 255, 3)
        fg = rng.uniform(0, 255, 3)
        if np.abs(fg - bg).max() < 80:  # keep the shape visible
            fg = 255.0 - bg
        r = rng.uniform(6.0, 12.0)
        cx, cy = rng.uniform(r, s - 1 - r, 2)  # the shape stays inside the image
        grad = rng.normal(0, 1.5, 2)
        img = bg + ((xx - s / 2) * grad[0] + (yy - s / 2) * grad[1])[..., None]
        mask = _shape_mask(int(labels[i]), xx - cx, yy - cy, r)
        img = np.where(mask[..., None], fg, img)
        img = img + rng.normal(0, 18.0, (s, s, 3))
        images[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return images, labels


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Small deterministic image classification dataset of coloured shapes on noise (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "32x32 RGB images of one of 8 shapes (random colour, size, position) on a noisy "
                "gradient background; generated with numpy, deterministic."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(_SYNTH_SIZE, _SYNTH_SIZE, 3)),
                "label": tfds.features.ClassLabel(names=list(SHAPE_NAMES)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in _SYNTH_SPLITS}

    def _generate_examples(self, split):
        images, labels = generate_shapes(_SYNTH_SPLITS[split], _SYNTH_SEEDS[split])
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


# --------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------
_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_INFOS = {
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (28, 28, 1), 10, _FASHION_MNIST_CLASSES, {"train": 60000, "test": 10000}
    ),
    "synthetic_shapes": DatasetInfo(
        "synthetic_shapes", (_SYNTH_SIZE, _SYNTH_SIZE, 3), len(SHAPE_NAMES), SHAPE_NAMES,
        dict(_SYNTH_SPLITS),
    ),
}


def info(name: str, image_size: int | None = None, channels: int | None = None) -> DatasetInfo:
    """Static facts about a dataset (no preparation; a folder dataset lists its folders and
    decodes its first image). `image_size` / `channels`: folder datasets only."""
    _check_folder_options(name, image_size, channels)
    if image_folder.is_folder_dataset(name):
        folder = image_folder.layout(name)
        return DatasetInfo(name, image_folder.image_shape(folder, image_size, channels), len(folder.class_names),
                           folder.class_names, {split: len(files) for split, files in folder.files.items()})
    _check_name(name)
    i = _INFOS[name]
    return dataclasses.replace(i, splits=dict(i.splits))


def prepare(name: str, data_dir=None):
    """Prepares `name` in `data_dir` if needed (offline) and returns its TFDS builder."""
    _check_name(name)
    data_dir = os.fspath(data_dir or default_data_dir())
    os.makedirs(data_dir, exist_ok=True)
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    # Two jobs started on a fresh machine (a benchmark beside a training run) would both
    # generate the dataset, and the second to finish fails renaming onto the first's output.
    with _exclusive_lock(os.path.join(data_dir, f".prepare_{name}.lock")):
        builder = tfds.builder(name, data_dir=data_dir)  # another job may have prepared it meanwhile
        if not builder.is_prepared():
            if name == "fashion_mnist":
                _prepare_fashion_mnist(builder)
            else:
                with _no_downloads():
                    builder.download_and_prepare(download_config=_download_config())
    return builder


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """Holds an exclusive lock on `path` across processes (released if the holder dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_arrays(name: str, split: str = "train", data_dir=None, image_size: int | None = None,
                channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W,C], labels int64 [N]) of `split` (TFDS split syntax, e.g. 'train[:10%]').

    Prepares the dataset on first use, offline. The order is TFDS's (deterministic). A folder
    dataset (`folder:ROOT`, see recipes.image_folder) is read from its files, in path order,
    at `image_size` / `channels` if given.
    """
    _check_folder_options(name, image_size, channels)
    if image_folder.is_folder_dataset(name):
        folder = image_folder.layout(name)
        image_folder.split_files(folder, split)  # an unknown split fails before any image is decoded
        shape = image_folder.image_shape(folder, image_size, channels)
        return image_folder.load_split(folder, split, shape, resize=image_size is not None)
    builder = prepare(name, data_dir)
    ds = builder.as_dataset(split=split, as_supervised=True, batch_size=-1, shuffle_files=False)
    images, labels = tfds.as_numpy(ds)
    return np.asarray(images, np.uint8), np.asarray(labels, np.int64)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 256,
    shuffle: bool = True,
    seed: int = 0,
    with_index: bool = False,
    repeat: bool = False,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Batches of `{"image": uint8 [B,H,W,C], "label": int64 [B], "index": int64 [B]}`.

    "label" only when `labels` is given, "index" (position in `images`) only with `with_index`.
    Images stay uint8: augmentation happens in the recipe's train step on the whole batch.
    Shuffling reshuffles every epoch and is deterministic for a given `seed`; with `repeat` the
    epochs run on without a break (shuffle -> repeat -> batch). Batches are gathered from
    in-memory tensors by index (one gather per batch) and prefetched.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 [N,H,W,C]; got {images.dtype} with shape {images.shape}"
        )
    n = len(images)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if n == 0 or (drop_remainder and not repeat and n < batch_size):
        raise ValueError(
            f"{n} images give no batch of {batch_size} with drop_remainder=True; lower batch_size "
            "or pass drop_remainder=False"
        )

    images_t = tf.constant(images)
    labels_t = tf.constant(labels.astype(np.int64)) if labels is not None else None

    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def _gather(idx):
        out = {"image": tf.gather(images_t, idx)}
        if labels_t is not None:
            out["label"] = tf.gather(labels_t, idx)
        if with_index:
            out["index"] = idx
        return out

    ds = ds.map(_gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def split_labelled(
    labels: np.ndarray, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (labelled_idx, unlabelled_idx), both sorted np.int64, disjoint and complete.

    Exactly one of `per_class` (exactly N per class) or `fraction` (round(fraction * count) per
    class, at least 1) must be given. Deterministic for a given `seed`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction= or per_class=")
    if fraction is not None:
        if isinstance(fraction, bool) or not np.isscalar(fraction) or not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    else:
        if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
            raise ValueError(f"per_class must be a positive int, got {per_class!r}")

    classes, counts = np.unique(labels, return_counts=True)
    if per_class is not None and per_class > counts.min():
        small = {int(c): int(k) for c, k in zip(classes, counts) if k < per_class}
        raise ValueError(
            f"per_class={per_class} is larger than some classes (class: count): {small}"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for c, count in zip(classes, counts):
        idx = np.flatnonzero(labels == c)
        k = per_class if per_class is not None else max(1, int(round(float(fraction) * count)))
        chosen.append(rng.permutation(idx)[:k])
    labelled = np.sort(np.concatenate(chosen)).astype(np.int64)
    mask = np.ones(len(labels), bool)
    mask[labelled] = False
    return labelled, np.flatnonzero(mask).astype(np.int64)
