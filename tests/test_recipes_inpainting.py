"""Context Encoders (`inpainting`): losses and masks against numpy, distributed equality, learning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.augment import GlobalDraws
from recipes.base import get_recipe_class
from recipes.losses import discriminator_loss, generator_adversarial_loss, reconstruction_loss
from recipes.pretext.inpainting import central_masks, loss_weights, random_block_masks
from tests.distributed_utils import (compare_one_vs_two_replicas, distribute_batch, float64, two_replica_strategy)
from tests.encoders import small_encoder
from tests.test_recipes_ssl import _loss_drops_on_fixed_views, _trainables

SHAPE = (16, 16, 1)


def _inpainting(shape=SHAPE, **config):
    return get_recipe_class("inpainting")(small_encoder(shape), decoder_width=8, discriminator_width=8, **config)


def _images(rows, seed=1):
    return np.random.RandomState(seed).randint(0, 256, (rows, *SHAPE)).astype("uint8")


# ---- losses against numpy -----------------------------------------------------------------------
def _numpy_reconstruction(predictions, targets, hole, region, overlap_weight):
    """Per image: (sum over the hole + overlap_weight * sum over the band) / (C * pixels of the region)."""
    losses = []
    for p, t, h, r in zip(predictions, targets, hole.astype(bool), region.astype(bool)):
        squared = (p - t) ** 2  # [H, W, C]
        band = r & ~h
        losses.append((squared[h].sum() + overlap_weight * squared[band].sum()) / (r.sum() * p.shape[-1]))
    return np.array(losses)


def test_reconstruction_loss_weights_the_overlap_band_against_numpy():
    rng = np.random.RandomState(0)
    predictions, targets = rng.uniform(-1, 1, (2, 8, 8, 2)), rng.uniform(-1, 1, (2, 8, 8, 2))
    hole, region = np.zeros((2, 8, 8)), np.zeros((2, 8, 8))
    hole[0, 2:6, 2:6], region[0, 1:7, 1:7] = 1, 1  # a central hole with a 1-px band
    hole[1, 0:3, 5:8] = region[1, 0:3, 5:8] = 1  # a block without a band
    weights = loss_weights(tf.constant(hole[..., None]), tf.constant(region[..., None]), 10.0)
    losses = reconstruction_loss(tf.constant(predictions), tf.constant(targets), weights).numpy()
    np.testing.assert_allclose(losses, _numpy_reconstruction(predictions, targets, hole, region, 10.0), rtol=1e-12)
    # The band counts: without its weight the loss of image 0 would differ.
    assert not np.isclose(losses[0], _numpy_reconstruction(predictions, targets, hole, region, 1.0)[0])


def test_adversarial_losses_against_numpy():
    real, fake = np.array([2.0, -1.0, 0.3]), np.array([-0.5, 1.5, 0.0])
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(discriminator_loss(tf.constant(real), tf.constant(fake)),
                               -np.log(sigmoid(real)) - np.log(1 - sigmoid(fake)), rtol=1e-12)
    np.testing.assert_allclose(generator_adversarial_loss(tf.constant(fake)), -np.log(sigmoid(fake)), rtol=1e-12)


# ---- masks ----------------------------------------------------------------------------------------
def test_central_mask_is_the_middle_half_square_with_a_proportionate_band():
    for side, overlap, start, band_start in ((16, 1, 4, 3), (28, 2, 7, 5)):
        hole, region = central_masks(side, side, overlap)
        expected_hole, expected_region = np.zeros((side, side)), np.zeros((side, side))
        expected_hole[start:side - start, start:side - start] = 1  # half the side: the paper's 64 of 128
        expected_region[band_start:side - band_start, band_start:side - band_start] = 1
        np.testing.assert_array_equal(hole, expected_hole)
        np.testing.assert_array_equal(region, expected_region)
        # The recipe's default band is the paper's 7 px of 128, in proportion: 1 px at 16, 2 px at 28.
        assert get_recipe_class("inpainting")(small_encoder((side, side, 1)), mask="center").overlap == overlap


def test_random_blocks_cover_at_most_a_quarter_and_differ_between_images_and_steps():
    def draw(step):
        seed = tf.random.experimental.stateless_fold_in(tf.constant([0, 0]), step)
        return random_block_masks(GlobalDraws(seed, 32, 32), 16, 16, num_blocks=4, coverage=0.25).numpy()

    masks = draw(0)
    fractions = masks.mean(axis=(1, 2))
    assert fractions.min() >= 16 / 256 and fractions.max() <= 0.25  # one 4x4 block .. four disjoint ones
    assert fractions.max() == 0.25 and len(np.unique(fractions)) > 1  # overlaps happen, disjoint ones too
    assert len({m.tobytes() for m in masks}) == 32  # every image its own blocks
    assert (draw(1) != masks).any()  # and new ones at the next step


@pytest.mark.parametrize("mask", ["random_block", "random_region"])
def test_masks_are_the_same_on_one_and_two_replicas(mask):
    recipe = _inpainting(mask=mask)
    seed = tf.constant([3, 7])
    one = recipe.masks(seed, 8, 8)[0].numpy()
    strategy = two_replica_strategy()
    per_replica = tf.function(lambda: strategy.run(lambda: recipe.masks(seed, 4, 8)[0]))()
    two = np.concatenate([t.numpy() for t in strategy.experimental_local_results(per_replica)])
    np.testing.assert_array_equal(two, one)
    assert len({m.tobytes() for m in one}) == 8
    if mask == "random_region":  # exactly the coverage, in blobs
        np.testing.assert_array_equal(one.sum(axis=(1, 2, 3)), np.full(8, 64))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Unknown mask 'square'"):
        _inpainting(mask="square")
    with pytest.raises(ValueError, match="too small for a central mask"):
        _inpainting(shape=(3, 3, 1), mask="center")
    with pytest.raises(ValueError, match="does not fit"):
        _inpainting(mask="center", overlap=5)
    with pytest.raises(ValueError, match="too small for 100 blocks"):
        _inpainting(num_blocks=100)
    with pytest.raises(ValueError, match="mask='center' only"):
        _inpainting(overlap=2)
    with pytest.raises(ValueError, match="adversarial_weight"):
        _inpainting(adversarial_weight=1.0)


# ---- the recipe's loss, end to end, against numpy -----------------------------------------------
@pytest.mark.parametrize("adversarial_weight", [0.0, 0.5])
def test_recipe_loss_against_numpy_on_mirror_symmetric_images(adversarial_weight):
    """No translation and no dropout, on images equal to their mirror image: the view is the image
    whatever the flip, so the loss can be recomputed outside the recipe from its own networks."""
    with float64():
        recipe = _inpainting(mask="center", translate=0.0, dropout=0.0, adversarial_weight=adversarial_weight)
        recipe.compile(optimizer=keras.optimizers.SGD(0.1))
        half = np.random.RandomState(2).randint(0, 256, (4, 16, 8, 1)).astype("float64")
        images = np.concatenate([half, half[:, :, ::-1]], axis=2)
        loss, state = recipe.loss_terms({"image": tf.constant(images.astype("uint8"))})

        hole, region = np.zeros((4, 16, 16, 1)), np.zeros((4, 16, 16, 1))
        hole[:, 4:12, 4:12], region[:, 3:13, 3:13] = 1, 1
        context = np.where(hole > 0, 127.5, images)  # small_encoder has no normalization layer: mid-grey
        predictions = recipe.decoder(recipe.encoder(context, training=True), training=True).numpy()
        targets = images / 127.5 - 1
        expected = _numpy_reconstruction(predictions, targets, hole[..., 0], region[..., 0], 10.0)
        if adversarial_weight:
            real = recipe.discriminator(region * targets, training=True).numpy()[:, 0]
            fake = recipe.discriminator(region * predictions, training=True).numpy()[:, 0]
            d_fake = 1 / (1 + np.exp(-fake))
            expected = 0.5 * expected + 0.5 * -np.log(d_fake)
            np.testing.assert_allclose(
                float(state["discriminator_loss"]),
                np.mean(-np.log(1 / (1 + np.exp(-real))) - np.log(1 - d_fake)), rtol=1e-10)
        np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-10)


# ---- distributed equality and learning ----------------------------------------------------------
def test_inpainting_one_vs_two_replicas_and_learning():
    """Random blocks and the decoder's dropout, both drawn for the global batch; split BN."""
    batch = {"image": _images(8)}
    with float64():
        recipe, _ = compare_one_vs_two_replicas(lambda: _inpainting(bn_splits=2), batch, state_fn=_trainables)
        assert recipe.get_config()["mask"] == "random_block" and recipe.embedding_head() is None
        assert recipe.discriminator is None
        _loss_drops_on_fixed_views(recipe, batch)


def _discriminator_gradients(strategy, recipe, batch):
    data = distribute_batch(strategy, batch)

    @tf.function
    def run():
        _, _, state = strategy.run(recipe.loss_and_gradients, args=(data,))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in state["discriminator_gradients"]]

    return [np.asarray(g) for g in run()]


def test_adversarial_inpainting_one_vs_two_replicas_with_its_discriminator():
    """Generator loss and gradients (through the discriminator), the discriminator's gradients, and
    both models and the discriminator's optimizer after one step, on 1 and 2 replicas."""
    batch = {"image": _images(8, seed=3)}

    def state(recipe):
        return (_trainables(recipe) + [w.value for w in recipe.discriminator.trainable_variables]
                + [recipe.discriminator_optimizer.iterations])

    with float64():
        recipe_1, recipe_2 = compare_one_vs_two_replicas(
            lambda: _inpainting(mask="center", adversarial_weight=0.5, bn_splits=2), batch, state_fn=state)
        discriminator = {id(v) for v in recipe_1.discriminator.trainable_variables}
        assert discriminator and not discriminator & {id(v) for v in recipe_1.optimized_variables}
        assert int(recipe_1.discriminator_optimizer.iterations) == 1
        grads_1 = _discriminator_gradients(tf.distribute.OneDeviceStrategy("/cpu:0"), recipe_1, batch)
        grads_2 = _discriminator_gradients(two_replica_strategy(), recipe_2, batch)
        assert any(np.abs(g).max() > 0 for g in grads_1)
        for g1, g2 in zip(grads_1, grads_2):
            np.testing.assert_allclose(g2, g1, rtol=1e-7, atol=1e-9)


def test_checkpoint_holds_the_discriminator_optimizer(tmp_path):
    recipe = _inpainting(mask="center", adversarial_weight=0.001)
    recipe.discriminator_optimizer.iterations.assign(7)
    path = tf.train.Checkpoint(model=recipe).write(str(tmp_path / "ckpt"))
    assert any("discriminator_optimizer" in name for name, _ in tf.train.list_variables(path))
    restored = _inpainting(mask="center", adversarial_weight=0.001)
    tf.train.Checkpoint(model=restored).read(path).assert_existing_objects_matched()
    assert int(restored.discriminator_optimizer.iterations) == 7
