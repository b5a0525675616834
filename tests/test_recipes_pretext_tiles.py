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
    assert tiles.shape == (4, 9, 4, 4, 1)  # 16 px: cells of 5, tiles of 4, a 1-px gap and no jitter
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


def _coordinate_images(side, n):
    """[n, side, side, 2] images whose pixels hold their own (row, column)."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return np.broadcast_to(np.stack([rows, cols], axis=-1), (n, side, side, 2)).astype(np.float32)


def test_neighbouring_tiles_never_touch():
    from recipes.pretext.tiles import tile_geometry, tile_offsets

    for side in (16, 28, 32, 48, 96):
        cell, tile = tile_geometry(side)
        low, high = tile_offsets(cell, tile)
        min_gap = max(1, (cell - tile) // 2)
        margin = (side - 3 * cell) // 2
        tops, lefts = [], []
        for seed in range(4):
            tiles = grid_tiles(tf.constant(_coordinate_images(side, 256)), tf.constant([seed, 7]), 256).numpy()
            top, left = tiles[:, :, 0, 0, 0], tiles[:, :, 0, 0, 1]  # [B, 9]
            # each tile an unscaled, contiguous piece of the image
            assert (tiles[..., 0] == top[:, :, None, None] + np.arange(tile)[:, None]).all(), side
            assert (tiles[..., 1] == left[:, :, None, None] + np.arange(tile)[None, :]).all(), side
            tops.append(top.reshape(-1, 3, 3)), lefts.append(left.reshape(-1, 3, 3))
        top, left = np.concatenate(tops), np.concatenate(lefts)
        # the pixels strictly between a tile and its right (lower) neighbour: at least min_gap >= 1
        horizontal_gaps = left[:, :, 1:] - (left[:, :, :-1] + tile)
        vertical_gaps = top[:, 1:, :] - (top[:, :-1, :] + tile)
        assert horizontal_gaps.min() >= min_gap >= 1 and vertical_gaps.min() >= min_gap, side
        offsets = np.concatenate([(top - margin - cell * np.arange(3)[:, None]).ravel(),
                                  (left - margin - cell * np.arange(3)[None, :]).ravel()])
        assert set(offsets.astype(int)) == set(range(low, high + 1)), side  # every allowed jitter, no other
        if side >= 28:
            assert high > low, side  # some jitter is left


def _keep_one_channel_reference(tiles, keep, noise, epsilon=1.0):
    """numpy, tile by tile: the kept channel centred, the others noise, RMS 64 around 127.5."""
    out = np.empty_like(tiles)
    for b, i in itertools.product(range(tiles.shape[0]), range(tiles.shape[1])):
        x = noise[b, i].copy()
        k = keep[b, i]
        x[..., k] = tiles[b, i, ..., k] - tiles[b, i, ..., k].mean()
        out[b, i] = x / np.sqrt(np.mean(x ** 2) + epsilon) * 64.0 + 127.5
    return out


def test_context_colour_drop_keeps_one_channel_per_tile_against_numpy():
    from recipes.pretext.context import colour_drop_draws, drop_colour

    tiles = np.random.RandomState(1).uniform(0, 255, (3, 9, 4, 4, 3)).astype(np.float32)
    keep, noise = (x.numpy() for x in colour_drop_draws(tf.constant([5, 6]), 3, 3, (4, 4), tiles=9))
    assert keep.shape == (3, 9) and set(keep.ravel()) == {0, 1, 2} and noise.shape == (3, 9, 4, 4, 3)
    assert -0.5 <= noise.min() and noise.max() < 0.5 and noise.std() > 0.2
    out = drop_colour(tf.constant(tiles), tf.constant(keep), tf.constant(noise)).numpy()
    np.testing.assert_allclose(out, _keep_one_channel_reference(tiles, keep, noise), rtol=1e-5, atol=1e-3)
    for b, i in itertools.product(range(3), range(9)):
        centred, kept = out[b, i] - 127.5, keep[b, i]
        dropped = [c for c in range(3) if c != kept]
        # the kept channel is the input's, up to scale and shift; the other two are the noise, scaled alike
        assert np.corrcoef(centred[..., kept].ravel(), tiles[b, i, ..., kept].ravel())[0, 1] > 0.9999
        ratio = np.median(centred[..., dropped] / noise[b, i][..., dropped])
        np.testing.assert_allclose(centred[..., dropped], noise[b, i][..., dropped] * ratio, atol=1e-3)


def test_context_pairs_colour_dropped_or_standardized():
    """Only the centre and the drawn neighbour are normalized, each on its own."""
    from recipes.pretext.context import centre_and_neighbour, colour_drop_draws, drop_colour

    labels = tf.constant([0, 3, 7, 5])

    def pairs_of(shape, **hparams):
        recipe = get_recipe_class("context")(small_encoder(shape), tile_dim=8, hidden_dim=16, **hparams)
        recipe.compile(optimizer="sgd")
        images = np.random.RandomState(2).randint(0, 256, (4, *shape)).astype("uint8")
        pairs = centre_and_neighbour(grid_tiles(tf.constant(images), recipe.step_seed(1), 4), labels)
        return recipe, pairs, recipe.normalized_pairs(tf.constant(images), labels, 4).numpy()

    recipe, pairs, got = pairs_of((16, 16, 3))
    assert got.shape == (4, 2, 4, 4, 3)
    expected = drop_colour(pairs, *colour_drop_draws(recipe.step_seed(3), 4, 4, (4, 4))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert recipe.get_config()["colour_drop"] is True
    for hparams, shape in (({"colour_drop": False}, (16, 16, 3)), ({}, (16, 16, 1))):  # no drop: standardized
        recipe, pairs, got = pairs_of(shape, **hparams)
        np.testing.assert_allclose(got, standardize_tiles(pairs).numpy(), rtol=1e-6)


def test_jigsaw_tiles_normalized_per_channel_against_numpy():
    tiles = np.random.RandomState(3).uniform(0, 255, (2, 9, 4, 4, 3)).astype(np.float32)
    tiles[..., 2] *= 0.1  # a dim channel: per-channel normalization must lift it
    got = standardize_tiles(tf.constant(tiles), per_channel=True).numpy()
    mean, var = tiles.mean(axis=(2, 3), keepdims=True), tiles.var(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(got, (tiles - mean) / np.sqrt(var + 1.0) * 64 + 127.5, rtol=1e-5)


def test_jigsaw_grey_images_and_channel_shifts_against_numpy():
    from recipes.pretext.jigsaw import chromatic_defence, shift_channels

    rng = np.random.RandomState(4)
    tiles = rng.uniform(0, 255, (2, 9, 4, 4, 3)).astype(np.float32)
    shifts = rng.randint(-2, 2, (2, 9, 3)).astype(np.float32)
    np.testing.assert_array_equal(shift_channels(tf.constant(tiles), tf.constant(shifts)).numpy(),
                                  np.clip(tiles + shifts[:, :, None, None, :], 0, 255))

    luminance = tiles @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = chromatic_defence(tf.constant(tiles), tf.constant([1, 2]), 2, grayscale_p=1.0, channel_shift=0).numpy()
    np.testing.assert_allclose(grey, np.repeat(luminance[..., None], 3, axis=-1), rtol=1e-6)

    many = np.full((2000, 9, 2, 2, 3), 100.0, np.float32)
    many[..., 1] = 150.0  # colour, away from the clipping bounds: out - in is the shift
    out = chromatic_defence(tf.constant(many), tf.constant([1, 2]), 2000, grayscale_p=0.3, channel_shift=2).numpy()
    grey_tiles = np.abs(out[..., 1] - out[..., 0]).max(axis=(2, 3)) < 10  # [B, 9]: else 50 grey levels apart
    became_grey = grey_tiles.all(axis=1)
    np.testing.assert_array_equal(grey_tiles, np.broadcast_to(became_grey[:, None], grey_tiles.shape))  # per image
    assert 0.27 < became_grey.mean() < 0.33
    expected_base = np.where(became_grey[:, None, None, None, None],
                             (many @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], many)
    shift = out - expected_base
    # one shift per tile and channel
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :, :1, :1, :], shift.shape), atol=1e-4)
    values, counts = np.unique(np.round(shift[:, :, 0, 0, :]), return_counts=True)
    np.testing.assert_array_equal(values, [-2, -1, 0, 1])  # the reference's randint(-2, 2)
    assert counts.min() > 0.2 * counts.sum()
    np.testing.assert_array_equal(chromatic_defence(tf.constant(many[:4]), tf.constant([1, 2]), 4, 0.0, 0).numpy(),
                                  many[:4])


def _colour_images(n=8, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, 16, 16, 3)).astype("uint8")


def test_jigsaw_and_context_colour_one_vs_two_replicas():
    for name, hparams in (("jigsaw", {"num_permutations": 10}), ("context", {})):
        def make(name=name, hparams=hparams):
            return get_recipe_class(name)(small_encoder((16, 16, 3)), tile_dim=8, hidden_dim=16, bn_splits=2, **hparams)

        with float64():
            compare_one_vs_two_replicas(make, {"image": _colour_images(8)}, state_fn=_trainables)
