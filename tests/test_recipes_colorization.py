"""Colorization (Zhang et al. 2016): Lab, bins, soft encoding, rebalancing, loss and annealed mean
against numpy; 1 vs 2 replicas (loss, gradients, the running bin distribution); learning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.base import get_recipe_class
from recipes.losses import colorization_loss
from recipes.pretext.colorization import (ab_bins, annealed_mean, colour_images, dense_soft_encoding, desaturate,
                                          rebalancing_weights, rgb_to_lab, soft_encode)
from tests.distributed_utils import compare_one_vs_two_replicas, float64
from tests.encoders import small_encoder
from tests.test_recipes_ssl import _loss_drops_on_fixed_views, _trainables

SHAPE = (16, 16, 3)


# ---- numpy references ---------------------------------------------------------------------
def _np_lab(rgb):
    """sRGB [..., 3] in [0, 255] -> Lab, written out from the standard (IEC 61966-2-1, CIE 15)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    r, g, b = linear[..., 0], linear[..., 1], linear[..., 2]
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883

    def f(t):
        return np.where(t > 216.0 / 24389.0, np.cbrt(t), (24389.0 / 27.0 * t + 16.0) / 116.0)

    return np.stack([116.0 * f(y) - 16.0, 500.0 * (f(x) - f(y)), 200.0 * (f(y) - f(z))], axis=-1)


def _np_soft_encoding(ab, bins, k=5, sigma=5.0):
    """Dense Z [..., Q] and the nearest bin [...]: k nearest bins, Gaussian weights."""
    flat = ab.reshape(-1, 2)
    distances = np.sqrt(((flat[:, None, :] - bins[None]) ** 2).sum(-1))
    z = np.zeros((len(flat), len(bins)))
    for row, d in enumerate(distances):
        nearest = np.argsort(d)[:k]
        weights = np.exp(-d[nearest] ** 2 / (2 * sigma ** 2))
        z[row, nearest] = weights / weights.sum()
    return z.reshape(*ab.shape[:-1], len(bins)), distances.argmin(1).reshape(ab.shape[:-1])


def _np_rebalancing(prior, bins, lam=0.5, sigma=5.0, grid=10.0):
    """The distribution put on the 2-d ab grid, blurred with a separable Gaussian, read back at the bins."""
    cells = np.rint(bins / grid).astype(int)
    cells -= cells.min(0) - 6
    image = np.zeros(cells.max(0) + 7)
    image[cells[:, 0], cells[:, 1]] = prior
    taps = np.exp(-(grid * np.arange(-6, 7)) ** 2 / (2 * sigma ** 2))
    image = np.apply_along_axis(lambda v: np.convolve(v, taps, mode="same"), 0, image)
    image = np.apply_along_axis(lambda v: np.convolve(v, taps, mode="same"), 1, image)
    smoothed = image[cells[:, 0], cells[:, 1]]
    smoothed /= smoothed.sum()
    w = 1.0 / ((1 - lam) * smoothed + lam / len(bins))
    return w / (smoothed * w).sum(), smoothed


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ---- colour space and bins ----------------------------------------------------------------
def test_rgb_to_lab_against_numpy_and_known_values():
    colours = np.random.RandomState(0).randint(0, 256, (4, 5, 3)).astype("uint8")
    colours[0, :2] = [[0, 0, 0], [3, 5, 8]]  # black and the linear branches of the gamma and of f
    np.testing.assert_allclose(rgb_to_lab(colours.astype("float64")), _np_lab(colours), atol=1e-6)
    np.testing.assert_allclose(rgb_to_lab(colours), _np_lab(colours), atol=2e-3)  # uint8 in, float32 out
    known = {(255, 255, 255): (100.0, 0.0, 0.0), (255, 0, 0): (53.24, 80.09, 67.20),
             (0, 255, 0): (87.73, -86.18, 83.18), (0, 0, 255): (32.30, 79.19, -107.86),
             (0, 0, 0): (0.0, 0.0, 0.0), (128, 128, 128): (53.59, 0.0, 0.0)}
    np.testing.assert_allclose(rgb_to_lab(np.array(list(known), "float64")), list(known.values()), atol=0.01)


def test_srgb_matrix_follows_from_the_primaries_and_d65():
    """The tabulated matrix is the one the sRGB primaries and the D65 white point define."""
    from recipes.pretext.colorization import D65_WHITE, SRGB_TO_XYZ

    def xyz(x, y):
        return np.array([x / y, 1.0, (1 - x - y) / y])

    primaries = np.stack([xyz(0.64, 0.33), xyz(0.30, 0.60), xyz(0.15, 0.06)], axis=1)
    white = xyz(0.3127, 0.3290)
    matrix = primaries * np.linalg.solve(primaries, white)
    # to 3e-4: the tabulated matrix maps white to CIE's tabulated D65 (Z 1.08883), not to xy's (Z 1.08906)
    np.testing.assert_allclose(SRGB_TO_XYZ, matrix, atol=3e-4)
    np.testing.assert_allclose(D65_WHITE, SRGB_TO_XYZ.sum(1), atol=1e-6)  # white (255, 255, 255) -> a = b = 0


def test_desaturate_keeps_lightness_and_removes_colour():
    colours = np.random.RandomState(1).randint(0, 256, (2, 7, 3)).astype("float64")
    grey = desaturate(colours).numpy()
    np.testing.assert_allclose(grey[..., 0], grey[..., 2])
    lab = rgb_to_lab(grey).numpy()
    np.testing.assert_allclose(lab[..., 0], _np_lab(colours)[..., 0], atol=1e-4)
    np.testing.assert_allclose(lab[..., 1:], 0.0, atol=1e-4)


def test_ab_bins_are_the_cells_srgb_reaches():
    bins = ab_bins(10.0)
    assert len(bins) == 261 and 240 <= len(bins) <= 330  # the paper's ImageNet gamut: 313
    assert not np.any(bins % 10) and len(np.unique(bins, axis=0)) == len(bins)
    # Independently: the 8-bit colours on the faces of the RGB cube (the gamut's outline) and a coarse interior.
    levels, coarse = np.arange(256.0), np.linspace(0, 255, 17)
    u, v = [g.ravel() for g in np.meshgrid(levels, levels)]
    faces = [np.insert(np.stack([u, v], 1), axis, value, axis=1) for axis in range(3) for value in (0.0, 255.0)]
    inside = np.stack(np.meshgrid(coarse, coarse, coarse), -1).reshape(-1, 3)
    reached = np.unique(np.rint(_np_lab(np.concatenate(faces + [inside]))[:, 1:] / 10) * 10, axis=0)
    np.testing.assert_array_equal(bins, reached)
    for cell in ([0, 0], [80, 70], [-90, 80], [80, -110]):  # grey, red, green, blue
        assert (bins == cell).all(1).any(), cell


# ---- targets, weights, loss, inference ----------------------------------------------------
def test_soft_encoding_against_numpy():
    bins = ab_bins()
    ab = np.random.RandomState(2).uniform(-100, 100, (2, 3, 4, 2))
    indices, weights = soft_encode(tf.constant(ab), bins)
    expected, nearest = _np_soft_encoding(ab, bins)
    np.testing.assert_allclose(dense_soft_encoding(indices, weights, len(bins)), expected, atol=1e-12)
    np.testing.assert_array_equal(indices[..., 0], nearest)
    assert indices.shape == (2, 3, 4, 5)


def test_rebalancing_weights_against_numpy():
    bins = ab_bins()
    rng = np.random.RandomState(3)
    prior = rng.gamma(0.3, size=len(bins)) * (rng.rand(len(bins)) < 0.5)  # skewed, half the bins unseen
    prior /= prior.sum()
    weights = rebalancing_weights(tf.constant(prior), bins).numpy()
    expected, smoothed = _np_rebalancing(prior, bins)
    np.testing.assert_allclose(weights, expected, rtol=1e-9)
    np.testing.assert_allclose((smoothed * weights).sum(), 1.0)
    assert weights[np.argmax(smoothed)] == weights.min()  # the commonest colour weighs least
    np.testing.assert_allclose(rebalancing_weights(tf.constant(prior), bins, rebalance_lambda=1.0), 1.0)


def test_loss_against_numpy():
    bins = ab_bins()
    rng = np.random.RandomState(4)
    ab = rng.uniform(-80, 80, (3, 2, 2, 2))
    logits = rng.normal(size=(3, 2, 2, len(bins)))
    class_weights = rng.uniform(0.5, 3.0, len(bins))
    indices, weights = soft_encode(tf.constant(ab), bins)
    losses = colorization_loss(tf.constant(logits), indices, weights, tf.gather(class_weights, indices[..., 0]))
    z, nearest = _np_soft_encoding(ab, bins)
    expected = (-class_weights[nearest] * (z * _np_log_softmax(logits)).sum(-1)).mean(axis=(1, 2))
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
    assert losses.shape == (3,)


def test_annealed_mean_against_numpy():
    bins = ab_bins()
    logits = np.random.RandomState(5).normal(scale=3.0, size=(2, 3, len(bins)))
    z = np.exp(_np_log_softmax(logits))
    annealed = np.exp(np.log(z) / 0.38)
    annealed /= annealed.sum(-1, keepdims=True)
    np.testing.assert_allclose(annealed_mean(tf.constant(logits), bins), annealed @ bins, rtol=1e-9)
    np.testing.assert_allclose(annealed_mean(tf.constant(logits), bins, temperature=1.0), z @ bins, rtol=1e-9)
    mode = bins[np.argmax(logits, -1)]
    np.testing.assert_allclose(annealed_mean(tf.constant(logits), bins, temperature=1e-3), mode, atol=1e-6)


# ---- the recipe -------------------------------------------------------------------------------
def test_colorization_needs_colour_images():
    with pytest.raises(ValueError, match="colour images.*--channels=3"):
        get_recipe_class("colorization")(small_encoder((16, 16, 1)))
    with pytest.raises(ValueError, match="target_stride"):
        get_recipe_class("colorization")(small_encoder((18, 18, 3)))


def test_colour_images_mask_against_hand_examples():
    """The released code's non-grey mask: an image counts when any pixel's |a| or |b| exceeds 5."""
    ab = np.zeros((4, 2, 2, 2))
    ab[1, 0, 1, 0] = 5.0  # at the threshold: still grey
    ab[2, 1, 1, 1] = -5.5  # one bluish pixel: colour
    ab[3] = 40.0
    np.testing.assert_array_equal(colour_images(tf.constant(ab)).numpy(), [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(colour_images(tf.constant(ab), threshold=6.0).numpy(), [0.0, 0.0, 0.0, 1.0])


def test_grey_images_teach_nothing_unless_asked():
    """A batch of grey images has loss 0 and no gradient with the mask; without it (None) it trains."""
    grey = np.repeat(np.random.RandomState(3).randint(0, 256, (4, 16, 16, 1)), 3, axis=-1).astype("uint8")
    for threshold, trains in ((5.0, False), (None, True)):
        keras.utils.set_random_seed(0)
        recipe = get_recipe_class("colorization")(small_encoder(SHAPE), decoder_dim=8, grey_threshold=threshold)
        recipe.compile(optimizer=keras.optimizers.SGD(0.1))
        assert recipe.get_config()["grey_threshold"] == threshold
        with tf.GradientTape() as tape:
            loss, _ = recipe.loss_terms({"image": tf.constant(grey)})
        gradients = tape.gradient(loss, recipe.trainable_variables)
        largest = max(float(tf.reduce_max(tf.abs(g))) for g in gradients if g is not None)
        assert (float(loss) > 0 and largest > 0) if trains else (float(loss) == 0 and largest == 0), threshold


def _state(recipe):
    return [recipe.prior.value, recipe.prior_pixels.value] + _trainables(recipe)


def test_colorization_one_vs_two_replicas_and_learning():
    """Split BN over 2 groups, and the bin histogram summed over replicas: both replicas rebalance with
    the global batch's distribution, so 1 and 2 replicas agree, in the loss and in the kept estimate."""
    batch = {"image": np.random.RandomState(6).randint(0, 256, (8, *SHAPE)).astype("uint8")}
    with float64():
        recipe, _ = compare_one_vs_two_replicas(
            lambda: get_recipe_class("colorization")(small_encoder(SHAPE), decoder_dim=8, prior_steps=1,
                                                     bn_splits=2), batch, state_fn=_state)
        assert recipe.get_config()["decoder_dim"] == 8 and recipe.embedding_head() is None
        assert float(recipe.prior_pixels.numpy()) == 8 * 4 * 4  # the global batch's 4 x 4 target pixels
        np.testing.assert_allclose(recipe.prior.numpy().sum(), 1.0)
        # prior_steps=1: estimated at step 0 only, frozen at step 1
        prior, pixels = recipe.updated_prior(tf.zeros([8, 4, 4], tf.int32))
        np.testing.assert_array_equal(prior, recipe.prior.numpy())
        assert recipe.predict_ab(batch["image"][:2]).shape == (2, 4, 4, 2)
        _loss_drops_on_fixed_views(recipe, batch)


def test_colorization_prior_is_a_running_mean_of_the_histograms():
    with float64():
        recipe = get_recipe_class("colorization")(small_encoder(SHAPE), decoder_dim=8)
        recipe.compile(optimizer=keras.optimizers.SGD(0.1))
        first = np.zeros(recipe.num_bins)
        first[[0, 1]] = [0.25, 0.75]
        recipe.prior.assign(first)
        recipe.prior_pixels.assign(4.0)  # 1 pixel in bin 0, 3 in bin 1
        nearest = tf.constant([[1, 2], [2, 2]])  # 1 more in bin 1, 3 in bin 2
        prior, pixels = recipe.updated_prior(nearest)
        expected = np.zeros(recipe.num_bins)
        expected[[0, 1, 2]] = [1 / 8, 4 / 8, 3 / 8]
        np.testing.assert_allclose(prior, expected, atol=1e-12)
        assert float(pixels) == 8.0
