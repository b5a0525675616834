"""Tile-based pretext tasks (jigsaw; the tile grid they share): against numpy, 1 vs 2 replicas, learning."""

import itertools

import numpy as np
import tensorflow as tf

from recipes.base import get_recipe_class
from recipes.pretext.jigsaw import permutation_set
from recipes.pretext.tiles import grid_tiles, standardize_tiles
from tests.distributed_utils import compare_one_vs_two_replicas, float64
from tests.encoders import small_encoder
from tests.test_recipes_ssl import _loss_drops_on_fixed_views, _trainables

SHAPE = (16, 16, 1)


def _images(n=8, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, *SHAPE)).astype("uint8")


def test_each_tile_is_a_jittered_piece_of_its_own_cell():
    images = _images(4)
    tiles = grid_tiles(tf.constant(images), tf.constant([3, 4]), 4).numpy()
    assert tiles.shape == (4, 9, 4, 4, 1)  # 16 px: cells of 5, tiles of 4, a 1-px jitter
    for b, place in itertools.product(range(4), range(9)):
        row, col = divmod(place, 3)
        candidates = [images[b, row * 5 + dy:row * 5 + dy + 4, col * 5 + dx:col * 5 + dx + 4]
                      for dy in (0, 1) for dx in (0, 1)]
        assert any(np.array_equal(tiles[b, place], c) for c in candidates), (b, place)
    standardized = standardize_tiles(tf.constant(tiles)).numpy()
    np.testing.assert_allclose(standardized.mean(axis=(2, 3, 4)), 127.5, atol=1e-3)


def test_permutation_set_is_the_greedy_maximal_hamming_set():
    every = np.array(list(itertools.permutations(range(9))))
    rng = np.random.default_rng(5)
    expected, total = [int(rng.integers(len(every)))], np.zeros(len(every))
    for _ in range(7):  # Algorithm 1 of the paper, by direct Hamming distances
        total += (every != every[expected[-1]]).sum(axis=1)
        total[expected] = -1
        expected.append(int(np.argmax(total)))
    np.testing.assert_array_equal(permutation_set(8, seed=5), every[expected])


def test_jigsaw_one_vs_two_replicas_and_learning():
    batch = {"image": _images(8)}
    make = lambda: get_recipe_class("jigsaw")(small_encoder(SHAPE), num_permutations=10, tile_dim=8,  # noqa: E731
                                              hidden_dim=16, bn_splits=2)
    with float64():
        recipe, _ = compare_one_vs_two_replicas(make, batch, state_fn=_trainables)
        _loss_drops_on_fixed_views(recipe, batch)


def test_context_one_vs_two_replicas_and_learning():
    batch = {"image": _images(8)}
    make = lambda: get_recipe_class("context")(small_encoder(SHAPE), tile_dim=8, hidden_dim=16,  # noqa: E731
                                               bn_splits=2)
    with float64():
        recipe, _ = compare_one_vs_two_replicas(make, batch, state_fn=_trainables)
        _loss_drops_on_fixed_views(recipe, batch)


def test_context_pairs_the_centre_with_the_neighbour_its_class_names():
    from recipes.pretext.context import centre_and_neighbour

    # every tile filled with its own place number, so a tile tells where it came from
    tiles = np.broadcast_to(np.arange(9, dtype=np.float32)[None, :, None, None, None], (8, 9, 2, 2, 1))
    pairs = centre_and_neighbour(tf.constant(tiles), tf.range(8)).numpy()
    np.testing.assert_array_equal(pairs[:, 0, 0, 0, 0], 4)  # the centre of the 3x3 grid
    np.testing.assert_array_equal(pairs[:, 1, 0, 0, 0], [0, 1, 2, 3, 5, 6, 7, 8])  # class k -> the k-th other place
