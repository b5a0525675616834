"""Your own images as a dataset: one folder per split, one subfolder per class.

    ROOT/train/<class name>/*.png|jpg|jpeg|bmp|gif|webp
    ROOT/test/<class name>/...

(the layout of TFDS's `ImageFolder` and Keras's `image_dataset_from_directory`). The
training CLI takes it as `--dataset=folder:ROOT`; a split is a subfolder's name
(`--train_split=train --test_split=test`, the defaults). Self-supervised recipes
never read the class of a training image, but the kNN / linear-probe evaluation
does, so the test split needs class folders. For a self-supervised recipe, training
images you have no class for can go under one folder of any name (`train/unlabelled/`):
only the kNN memory and the probe see that name as a class. Label recipes
(finetune, fixmatch, ...) would take it for a class, so give them classified images only.

Class ids are the sorted class names found in *any* split, so a class missing from
one split keeps the same id in the others. Every image is decoded to `channels`
(1 or 3; default: the first image's of split `train`) and, with `image_size`, scaled so
its shorter side is `image_size` and centre-cropped to a square (`zoo.images.fit_image`,
which the zoo's served signatures apply to the images they are sent); without it every
image must already have the first one's size. Images are held in memory as uint8,
as the built-in datasets are, which suits up to a few hundred thousand small
images; a file that does not decode stops the load with its path, before any
training.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

from zoo.images import decode_image, fit_image

PREFIX = "folder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class FolderDatasetError(ValueError):
    """The folder is missing, empty, laid out otherwise, or holds a file that is not an image."""


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    root: str
    class_names: tuple[str, ...]
    files: dict[str, list[tuple[str, int]]]  # split -> [(path, class id)], sorted by path


def is_folder_dataset(name: str) -> bool:
    return name.startswith(PREFIX)


def root_of(name: str) -> str:
    root = name[len(PREFIX):]
    if not root:
        raise FolderDatasetError(f"--dataset={name!r} names no folder; write --dataset=folder:/path/to/images.")
    return os.path.abspath(os.path.expanduser(root))


def _subfolders(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def _images_in(path: str) -> list[str]:
    return sorted(entry.path for entry in os.scandir(path)
                  if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES))


def layout(name: str) -> FolderLayout:
    """Splits, classes and files of `folder:ROOT` (lists directories, reads no image)."""
    root = root_of(name)
    if not os.path.isdir(root):
        raise FolderDatasetError(f"Dataset folder {root} does not exist. Expected {root}/<split>/<class>/<images>, "
                                 "e.g. train/ and test/ with one subfolder per class.")
    splits = {split: _subfolders(os.path.join(root, split)) for split in _subfolders(root)}
    splits = {split: classes for split, classes in splits.items() if classes}
    if not splits:
        raise FolderDatasetError(f"{root} has no split folder with class subfolders. Expected "
                                 f"{root}/<split>/<class>/<images>, e.g. {root}/train/cats/1.png.")
    class_names = tuple(sorted({name for classes in splits.values() for name in classes}))
    class_id = {name: i for i, name in enumerate(class_names)}
    files = {}
    for split, classes in splits.items():
        files[split] = sorted((path, class_id[c]) for c in classes for path in _images_in(os.path.join(root, split, c)))
        if not files[split]:
            raise FolderDatasetError(f"{os.path.join(root, split)} has class folders but no images "
                                     f"({', '.join(IMAGE_SUFFIXES)}).")
    return FolderLayout(root, class_names, files)


def split_files(folder: FolderLayout, split: str) -> list[tuple[str, int]]:
    if split not in folder.files:
        raise FolderDatasetError(f"No split {split!r} in {folder.root}; its splits are "
                                 f"{', '.join(sorted(folder.files))} (a folder dataset's split is a subfolder's "
                                 "name; TFDS slices such as train[:10%] are not supported).")
    return folder.files[split]


def _decode(path: str, channels: int) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            image = decode_image(f.read(), channels)
    except (tf.errors.OpError, OSError) as error:  # undecodable, truncated, unreadable
        message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", getattr(error, "message", str(error))).strip()
        raise FolderDatasetError(f"{path} is not a readable image ({message}). Remove or replace it.") from error
    return image.numpy()


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Scaled to cover size x size and centre-cropped, as the zoo's served signatures do."""
    return np.clip(np.rint(fit_image(image, size, size).numpy()), 0, 255).astype(np.uint8)


def image_shape(folder: FolderLayout, image_size: int | None = None, channels: int | None = None):
    """(H, W, C) the images load at: (image_size, image_size) or the size of the first image of
    split `train` (else of the first split); `channels` or that image's."""
    if channels is not None and channels not in (1, 3):
        raise FolderDatasetError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}.")
    if image_size is not None and image_size < 1:
        raise FolderDatasetError(f"--image_size must be a positive number of pixels, got {image_size}.")
    first_split = "train" if "train" in folder.files else sorted(folder.files)[0]
    first = _decode(folder.files[first_split][0][0], channels or 0)
    if channels is None:
        channels = 1 if first.shape[-1] == 1 else 3
    height, width = (image_size, image_size) if image_size else first.shape[:2]
    return int(height), int(width), int(channels)


def load_split(folder: FolderLayout, split: str, shape, resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, *shape], class ids int64 [N]) of one split, in path order; with `resize`
    (shape square), images of another size are scaled and centre-cropped to it."""
    height, width, channels = shape
    entries = split_files(folder, split)
    images = np.empty((len(entries), height, width, channels), np.uint8)
    for i, (path, _) in enumerate(entries):
        image = _decode(path, channels)
        if image.shape[:2] != (height, width):
            if not resize:
                raise FolderDatasetError(
                    f"{path} is {image.shape[1]}x{image.shape[0]} pixels where the first image is "
                    f"{width}x{height}; pass --image_size=N to resize every image to N x N.")
            image = _square(image, height)
        images[i] = image
    return images, np.array([label for _, label in entries], np.int64)
