"""Batched RandAugment / Cutout / weak view: each operation against PIL, views' invariants."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from recipes.semi import randaugment as ra
from tests.distributed_utils import two_replica_strategy

RGB = np.random.RandomState(0).randint(0, 256, (4, 12, 12, 3)).astype("uint8")
# Low-contrast grey images make auto-contrast and equalize do real work.
GREY = (np.random.RandomState(1).rand(4, 12, 12, 1) * 80 + 60).astype("uint8")


def _pil(images, fn):
    out = []
    for image in images:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out.append(np.asarray(fn(pil)).reshape(image.shape))
    return np.stack(out).astype(np.float32)


def _ours(op, images, strength=0.5, sign=1.0):
    n = len(images)
    return op(tf.constant(images, tf.float32), tf.fill([n], strength), tf.fill([n], sign)).numpy()


@pytest.mark.parametrize("images", [RGB, GREY], ids=["rgb", "grey"])
def test_histogram_operations_match_pil_exactly(images):
    np.testing.assert_array_equal(_ours(ra.equalize, images), _pil(images, ImageOps.equalize))
    np.testing.assert_allclose(_ours(ra.auto_contrast, images), _pil(images, ImageOps.autocontrast), atol=1.0)


def test_posterize_and_solarize_match_pil():
    # strength 0.5: 8 - 2 = 6 bits; solarize above 128.
    np.testing.assert_array_equal(_ours(ra.posterize, RGB), _pil(RGB, lambda im: ImageOps.posterize(im, 6)))
    np.testing.assert_array_equal(_ours(ra.solarize, RGB), _pil(RGB, lambda im: ImageOps.solarize(im, 128)))


@pytest.mark.parametrize("name, enhancer, atol", [
    ("brightness", ImageEnhance.Brightness, 1.0), ("color", ImageEnhance.Color, 2.0),
    ("contrast", ImageEnhance.Contrast, 2.0), ("sharpness", ImageEnhance.Sharpness, 1.0)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_enhance_operations_match_pil(name, enhancer, atol, sign):
    # strength 0.5 -> factor 1 +- 0.45.
    ours = _ours(getattr(ra, name), RGB, 0.5, sign)
    theirs = _pil(RGB, lambda im: enhancer(im).enhance(1.0 + 0.45 * sign))
    np.testing.assert_allclose(ours, theirs, atol=atol)


def test_each_image_gets_its_own_operation():
    x = tf.constant(RGB, tf.float32)
    choice = tf.constant([ra.OPERATIONS.index(n) for n in ("identity", "solarize", "translate_x", "identity")])
    out = ra.randaugment_layer(x, choice, tf.fill([4], 0.5), tf.ones([4])).numpy()
    np.testing.assert_array_equal(out[[0, 3]], RGB[[0, 3]])
    np.testing.assert_array_equal(out[1], _ours(ra.solarize, RGB)[1])
    # translate_x by 0.3 * 0.5 * 12 = 1.8 px: content moves, and the vacated border is grey.
    assert not np.allclose(out[2], RGB[2])
    np.testing.assert_allclose(out[2][:, -1], ra.GREY, atol=1e-3)


def test_weak_view_is_a_flip_or_a_reflecting_shift():
    seed = tf.constant([3, 4])
    flipped_only = ra.weak_view(RGB, seed, 4, translate=0.0).numpy()
    for view, image in zip(flipped_only, RGB):
        assert np.array_equal(view, image) or np.array_equal(view, image[:, ::-1])
    shifted = ra.weak_view(RGB, seed, 4, translate=0.125).numpy()
    assert shifted.dtype == np.float32 and shifted.shape == RGB.shape
    # A shift by up to 1 px (12.5% of 12) with reflection keeps the pixel multiset close: same values only.
    assert set(np.unique(shifted)) <= set(np.unique(RGB))


def test_strong_view_is_seeded_bounded_and_varies():
    a = ra.strong_view(RGB, tf.constant([1, 2]), 4).numpy()
    b = ra.strong_view(RGB, tf.constant([1, 2]), 4).numpy()
    c = ra.strong_view(RGB, tf.constant([1, 3]), 4).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 255.0 and a.shape == RGB.shape


def test_strong_view_rows_depend_on_the_global_batch_only():
    """Rows 2-3 of a global batch of 4 equal the second replica's view of its own two rows."""
    seed = tf.constant([5, 6])
    whole = ra.strong_view(RGB, seed, 4).numpy()
    strategy = two_replica_strategy()
    halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(RGB[2 * ctx.replica_id_in_sync_group:2 * ctx.replica_id_in_sync_group + 2]))
    per_replica = strategy.run(tf.function(lambda x: ra.strong_view(x, seed, 4)), args=(halves,))
    np.testing.assert_allclose(strategy.experimental_local_results(per_replica)[1].numpy(), whole[2:], atol=1e-4)


def test_cutout_paints_one_grey_square():
    policy = ra.StrongPolicy(num_ops=0, cutout=0.5)
    out = ra.strong_view(RGB, tf.constant([7, 8]), 4, policy).numpy()
    for view, image in zip(out, RGB):
        changed = np.any(view != image, axis=-1)
        assert np.all(view[changed] == ra.GREY)
        if changed.any():
            rows, cols = np.nonzero(changed)
            box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.mean() > 0.8 and max(box.shape) <= 6  # a (clipped) square, at most half the side
