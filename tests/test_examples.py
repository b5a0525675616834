"""examples/keras_api.py, the README's Keras-only path, runs as documented."""

import os
import subprocess
import sys

from recipes import data
from tests.test_image_folder import _write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_keras_api_example_trains_evaluates_publishes_and_reloads(tmp_path):
    """With SeLa, which needs both run facts (a row per image, the run's length) and a label step."""
    names = ["circle", "square", "triangle"]
    for split, n, seed in (("train", 400, 0), ("test", 24, 1)):  # >= 128 kept: one per SeLa cluster
        images, labels = data.generate_shapes(n, seed)
        keep = labels < len(names)
        _write_folder(tmp_path / "images", split, images[keep], labels[keep], names)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "examples/keras_api.py", f"--dataset=folder:{tmp_path / 'images'}", "--image_size=24",
         "--recipe=sela", "--batch_size=16", "--steps_per_epoch=2", f"--zoo_store={tmp_path / 'zoo'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kNN accuracy (k=200, T=0.1" in result.stdout
    assert "published my_encoder:1; reloaded encoder gives the same features: True" in result.stdout
