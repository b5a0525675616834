"""Your own images as a dataset (`folder:ROOT`): layout, decoding, resizing, errors, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from recipes import data, image_folder
from recipes.image_folder import FolderDatasetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(image).numpy())


def _write_folder(root, split, images, labels, names):
    for i, (image, label) in enumerate(zip(images, labels)):
        _write_png(root / split / names[label] / f"{i:04d}.png", image)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """synthetic shapes written as PNGs: train (64) and test (32), classes by name."""
    root = tmp_path_factory.mktemp("images")
    names = ["circle", "square", "triangle"]
    for split, n, seed in (("train", 64, 0), ("test", 32, 1)):
        images, labels = data.generate_shapes(n, seed)
        keep = labels < len(names)
        _write_folder(root, split, images[keep], labels[keep], names)
    return root, names


def test_the_folder_loads_its_images_and_classes(shapes_folder):
    root, names = shapes_folder
    info = data.info(f"folder:{root}")
    assert info.class_names == tuple(names) and info.num_classes == 3 and info.image_shape == (32, 32, 3)
    images, labels = data.load_arrays(f"folder:{root}", "train")
    expected_images, expected_labels = data.generate_shapes(64, 0)
    keep = expected_labels < 3
    # path order is class folder, then file name: sort the originals the same way
    order = np.lexsort((np.arange(keep.sum()), expected_labels[keep]))
    np.testing.assert_array_equal(labels, expected_labels[keep][order])
    np.testing.assert_array_equal(images, expected_images[keep][order])  # PNG is lossless
    assert info.splits == {"train": int(keep.sum()), "test": len(data.load_arrays(f"folder:{root}", "test")[1])}


def test_a_class_only_one_split_has_keeps_its_id(tmp_path):
    image = np.full((8, 8, 3), 100, np.uint8)
    _write_png(tmp_path / "train" / "b_cat" / "1.png", image)
    _write_png(tmp_path / "test" / "a_ant" / "1.png", image)
    _write_png(tmp_path / "test" / "b_cat" / "1.png", image)
    assert data.info(f"folder:{tmp_path}").class_names == ("a_ant", "b_cat")
    np.testing.assert_array_equal(data.load_arrays(f"folder:{tmp_path}", "train")[1], [1])
    np.testing.assert_array_equal(data.load_arrays(f"folder:{tmp_path}", "test")[1], [0, 1])


def test_image_size_scales_the_shorter_side_and_crops_the_centre(tmp_path):
    columns = np.repeat(np.arange(40, dtype=np.uint8)[None, :] * 6, 20, axis=0)  # 20 rows x 40 columns
    _write_png(tmp_path / "train" / "only" / "wide.png", np.stack([columns] * 3, axis=-1))
    images, _ = data.load_arrays(f"folder:{tmp_path}", "train", image_size=10)
    assert images.shape == (1, 10, 10, 3)
    # halved to 10 x 20, columns 5..14 kept: source columns 10..29, values 60..174 in steps of 12
    np.testing.assert_allclose(images[0, 5, :, 0], 6 * (2 * np.arange(5, 15) + 0.5), atol=2)


def test_channels_convert_grey_and_colour(tmp_path):
    _write_png(tmp_path / "train" / "g" / "grey.png", np.full((6, 6, 1), 77, np.uint8))
    _write_png(tmp_path / "train" / "g" / "rgb.png", np.full((6, 6, 3), 77, np.uint8))
    assert data.info(f"folder:{tmp_path}").image_shape == (6, 6, 1)  # the first image's ("grey" < "rgb")
    images, _ = data.load_arrays(f"folder:{tmp_path}", "train", channels=3)
    assert images.shape == (2, 6, 6, 3) and (images == 77).all()


def test_bad_folders_and_files_say_what_to_do(tmp_path):
    with pytest.raises(FolderDatasetError, match="does not exist.*<split>/<class>"):
        data.load_arrays(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "train").mkdir()
    with pytest.raises(FolderDatasetError, match="no split folder with class subfolders"):
        data.info(f"folder:{tmp_path}")
    _write_png(tmp_path / "train" / "a" / "1.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FolderDatasetError, match="No split 'test'.*splits are train"):
        data.load_arrays(f"folder:{tmp_path}", "test")
    _write_png(tmp_path / "train" / "a" / "2.png", np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(FolderDatasetError, match="2.png is 8x9 pixels.*--image_size"):
        data.load_arrays(f"folder:{tmp_path}", "train")
    assert data.load_arrays(f"folder:{tmp_path}", "train", image_size=8)[0].shape == (2, 8, 8, 3)
    (tmp_path / "train" / "a" / "3.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(FolderDatasetError, match="3.jpg is not a readable image"):
        data.load_arrays(f"folder:{tmp_path}", "train", image_size=8)
    (tmp_path / "train" / "a" / "3.jpg").unlink()
    png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    (tmp_path / "train" / "a" / "4.png").write_bytes(png[:len(png) // 2])  # cut off mid-file
    with pytest.raises(FolderDatasetError, match=r"4.png is not a readable image \(Invalid PNG"):
        data.load_arrays(f"folder:{tmp_path}", "train", image_size=8)
    with pytest.raises(FolderDatasetError, match="--channels must be 1"):
        data.info(f"folder:{tmp_path}", channels=2)
    with pytest.raises(ValueError, match="apply to folder datasets"):
        data.info("fashion_mnist", image_size=32)
    with pytest.raises(FolderDatasetError, match="names no folder"):
        image_folder.root_of("folder:")


def _train(args, tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "recipes.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_recipe_trains_on_a_folder_and_records_how_it_was_read(shapes_folder, tmp_path):
    root, names = shapes_folder
    args = [f"--dataset=folder:{root}", "--image_size=24", "--recipe=simclr", "--backbone=resnet18_small",
            "--width=0.125", "--batch_size=16", "--epochs=1", "--steps_per_epoch=2", "--knn_every=0",
            "--probe_epochs=0", "--verbose=0", "--hparams=hidden_dim=32,projection_dim=16",
            f"--model_dir={tmp_path / 'run'}"]
    result = _train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["dataset"] == f"folder:{root}" and run["image_size"] == 24 and run["input_shape"] == [24, 24, 3]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["knn"]["accuracy"] <= 1.0

    broken = _train([*args[:1], "--image_size=24", *args[2:-1], f"--model_dir={tmp_path / 'other'}",
                     "--test_split=validation"], tmp_path)
    assert broken.returncode == 2 and "No split 'validation'" in broken.stderr and "Traceback" not in broken.stderr
