"""MoCo v2: distributed equality, queue mechanics, momentum update, learning signal."""

import numpy as np
import pytest
import tensorflow as tf

from recipes.contrastive.moco import MoCo
from tests.distributed_utils import build_recipe, compare_one_vs_two_replicas, train_step
from tests.encoders import small_encoder


def _images(n=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, 16, 16, 1)).astype("uint8")


def _make_moco(**overrides):
    def make():
        encoder = small_encoder()
        config = dict(queue_size=64, hidden_dim=32, projection_dim=16, momentum=0.9, bn_splits=2)
        config.update(overrides)
        return MoCo(encoder, **config)
    return make


def test_one_vs_two_replicas_equal_loss_gradients_queue():
    batch = {"image": _images(16)}
    recipe_1, recipe_2 = compare_one_vs_two_replicas(
        _make_moco(),
        batch,
        # Parameters, not BN moving statistics: with 2 BN groups on one device Keras
        # updates those twice in sequence, across 2 replicas it averages two updates;
        # they enter neither the loss nor the gradients.
        state_fn=lambda r: [r.queue.keys.value, r.queue.pointer.value]
        + [w.value for w in r.key_encoder.weights if w.trainable],
    )
    assert int(recipe_1.queue.pointer.numpy()) == 16


def test_queue_is_fifo_of_global_keys_in_batch_order():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    recipe = build_recipe(strategy, _make_moco(queue_size=32))
    before = recipe.queue.keys.numpy().copy()
    train_step(strategy, recipe, {"image": _images(16)})
    after = recipe.queue.keys.numpy()
    np.testing.assert_array_equal(after[16:], before[16:])  # untouched rows
    assert not np.allclose(after[:16], before[:16])
    np.testing.assert_allclose(np.linalg.norm(after[:16], axis=1), 1.0, atol=1e-5)
    train_step(strategy, recipe, {"image": _images(16, seed=1)})
    train_step(strategy, recipe, {"image": _images(16, seed=2)})
    assert int(recipe.queue.pointer.numpy()) == 16  # wrapped around: 48 % 32


def test_momentum_update_is_ema_of_query_parameters():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    recipe = build_recipe(strategy, _make_moco(momentum=0.9))
    # Make the two encoders differ, then apply one EMA step by hand and via the recipe.
    for w in recipe.encoder.trainable_weights:
        w.assign(w.numpy() + 1.0)
    query = [w.numpy() for w in recipe.encoder.trainable_weights]
    key_before = {w.path: w.numpy() for w in recipe.key_encoder.weights}
    recipe.before_update(None)
    key_trainable = [w for w, q in zip(recipe.key_encoder.weights, recipe.encoder.weights) if q.trainable]
    for key_w, q in zip(key_trainable, query):
        np.testing.assert_allclose(key_w.numpy(), 0.9 * key_before[key_w.path] + 0.1 * q, rtol=1e-6, atol=1e-6)


def test_bn_splits_must_divide_across_replicas():
    with pytest.raises(ValueError, match="bn_splits"):
        compare_one_vs_two_replicas(_make_moco(bn_splits=3), {"image": _images(12)})


def test_loss_decreases_when_training_on_a_fixed_batch():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    recipe = build_recipe(strategy, _make_moco(queue_size=64))
    ds = tf.data.Dataset.from_tensors({"image": _images(32)}).repeat()
    history = recipe.fit(ds, steps_per_epoch=10, epochs=3, verbose=0).history
    assert history["contrastive_acc"][-1] > history["contrastive_acc"][0] or history["loss"][-1] < history["loss"][0]
