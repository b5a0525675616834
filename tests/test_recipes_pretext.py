"""Pretext-task recipes (RotNet): rotations against numpy, distributed equality, learning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.base import get_recipe_class
from recipes.pretext.rotnet import rotate_all
from tests.distributed_utils import compare_one_vs_two_replicas, float64
from tests.encoders import small_encoder
from tests.test_recipes_ssl import _loss_drops_on_fixed_views, _trainables

SHAPE = (16, 16, 1)


def test_rotate_all_gives_each_image_at_the_four_quarter_turns():
    images = np.random.RandomState(0).randint(0, 256, (3, 5, 5, 2)).astype("uint8")
    rotated, labels = rotate_all(tf.constant(images))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 3))
    for k in range(4):  # counter-clockwise, as numpy's rot90 in the (row, column) plane
        np.testing.assert_array_equal(rotated[3 * k:3 * (k + 1)], np.rot90(images, k, axes=(1, 2)))
    with pytest.raises(ValueError, match="square images"):
        rotate_all(tf.zeros((2, 5, 6, 1)))


def test_rotnet_one_vs_two_replicas_and_learning():
    """bn_splits=2 on one device equals 2 replicas only if each BN group holds all four
    rotations of its own images (a group of one rotation would also leak the label)."""
    batch = {"image": np.random.RandomState(1).randint(0, 256, (8, *SHAPE)).astype("uint8")}
    with float64():
        recipe, _ = compare_one_vs_two_replicas(
            lambda: get_recipe_class("rotnet")(small_encoder(SHAPE), hidden_dim=16, bn_splits=2), batch,
            state_fn=_trainables)
        assert recipe.get_config()["hidden_dim"] == 16
        _loss_drops_on_fixed_views(recipe, batch)


def test_rotnet_head_is_linear_without_hidden_layer_and_has_no_embedding():
    recipe = get_recipe_class("rotnet")(small_encoder(SHAPE), hidden_dim=0)
    assert [type(layer).__name__ for layer in recipe.head.layers] == ["Dense"]
    assert recipe.embedding_head() is None


def test_counting_tiles_and_downsampling_against_numpy():
    from recipes.pretext.counting import downsample, tiles_2x2

    images = np.random.RandomState(2).rand(2, 4, 4, 1)
    tiles = tiles_2x2(tf.constant(images)).numpy()
    np.testing.assert_array_equal(tiles[1, 2], images[1, 2:, :2])  # bottom-left
    area = images.reshape(2, 2, 2, 2, 2, 1).mean(axis=(2, 4))
    down = downsample(tf.constant(images), tf.constant([0, 1])).numpy()
    np.testing.assert_allclose(down[0], area[0])
    np.testing.assert_allclose(down[1], tf.image.resize(images[1:], (2, 2), "nearest")[0])


def test_counting_downsampling_methods_really_differ():
    """Each method leaves its own artefacts (a bilinear resize by exactly 2 would equal area averaging):
    every pair of methods gives another half-size image of the same random image."""
    from recipes.pretext.counting import DOWNSAMPLING, downsample

    image = np.random.RandomState(5).rand(1, 28, 28, 1) * 255
    variants = [downsample(tf.constant(image), tf.constant([m])).numpy() for m in range(len(DOWNSAMPLING))]
    for i in range(len(variants)):
        for j in range(i + 1, len(variants)):
            assert np.abs(variants[i] - variants[j]).max() > 5.0, (DOWNSAMPLING[i], DOWNSAMPLING[j])


def test_counting_normalizes_an_image_and_its_tiles_together():
    """phi(D x) and phi(T_j x) come from one training-mode call, so BatchNorm uses one set of
    statistics for both: the loss equals counting_loss on the counts of that one call (two
    calls, one per input kind, would normalize each with its own statistics and differ)."""
    from recipes.losses import counting_loss
    from recipes.pretext.counting import DOWNSAMPLING, downsample, tiles_2x2

    images = np.random.RandomState(4).randint(0, 256, (4, *SHAPE)).astype("float64")
    with float64():
        recipe = get_recipe_class("counting")(small_encoder(SHAPE), count_dim=16)
        recipe.compile(optimizer=keras.optimizers.SGD(0.1))
        loss, _ = recipe.loss_terms({"image": tf.constant(images)})
        method = tf.random.stateless_uniform([4], recipe.step_seed(1), 0, len(DOWNSAMPLING), dtype=tf.int32)
        whole_and_tiles = np.concatenate([downsample(tf.constant(images), method).numpy()[:, None],
                                          tiles_2x2(tf.constant(images)).numpy()], axis=1)
        counts = recipe.counter(recipe.half_encoder(whole_and_tiles.reshape(20, 8, 8, 1), training=True)).numpy()
        counts = counts.reshape(4, 5, 16)
        expected = counting_loss(counts[:, 0], counts[:, 1:].sum(1), np.roll(counts[:, 0], -1, axis=0), 10.0)
        np.testing.assert_allclose(float(loss), float(tf.reduce_sum(expected)) / 4, rtol=1e-9)


def test_counting_one_vs_two_replicas_and_learning():
    batch = {"image": np.random.RandomState(3).randint(0, 256, (8, *SHAPE)).astype("uint8")}
    with float64():
        recipe, _ = compare_one_vs_two_replicas(
            lambda: get_recipe_class("counting")(small_encoder(SHAPE), count_dim=16, bn_splits=2), batch,
            state_fn=_trainables)
        _loss_drops_on_fixed_views(recipe, batch)
