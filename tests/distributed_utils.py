"""Runs a recipe's step on 1 device and on 2 logical CPU replicas with the same global batch."""

import contextlib

import keras
import numpy as np
import tensorflow as tf

TWO_CPUS = ["/cpu:0", "/cpu:1"]


def build_recipe(strategy, make_recipe, weights=None):
    """Builds a recipe + SGD under `strategy`; copies `weights` in to start equal."""
    with strategy.scope():
        recipe = make_recipe()
        recipe.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        recipe.optimizer.build(recipe.optimized_variables)
        if weights is not None:
            recipe.set_weights(weights)
    return recipe


def distribute_batch(strategy, batch):
    """Replica r gets rows [r*b, (r+1)*b) of every tensor in the dict."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return batch
    def value_fn(context):
        r = context.replica_id_in_sync_group
        # Per tensor: FixMatch's unlabelled batch has mu times the labelled rows.
        return {k: tf.constant(np.split(np.asarray(v), replicas)[r]) for k, v in batch.items()}

    return strategy.experimental_distribute_values_from_function(value_fn)


def loss_and_gradients(strategy, recipe, batch):
    """Loss and gradients summed over replicas (what the optimizer applies)."""
    data = distribute_batch(strategy, batch)

    @tf.function
    def run():
        loss, grads, _ = strategy.run(recipe.loss_and_gradients, args=(data,))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
        return loss, grads

    loss, grads = run()
    return float(loss), [np.asarray(g) for g in grads]


def train_step(strategy, recipe, batch):
    data = distribute_batch(strategy, batch)

    @tf.function
    def run():
        strategy.run(recipe.train_step, args=(data,))

    run()


_MIRRORED = {}


@contextlib.contextmanager
def float64():
    """Builds and runs models in float64 inside the block (Keras floatx), then restores it.

    Why the self-supervised recipes compare replicas in float64: BatchNorm over small
    groups amplifies float32 round-off in the stem's gradients up to ~1e-2 relative
    (measured for Barlow Twins with one initialization), as large as a real bug
    would be; in float64 the same comparison agrees to ~1e-15.
    """
    # Layers take their dtype from the global dtype policy, which Keras fixes from
    # floatx the first time it is asked: set both.
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous_floatx)
        keras.config.set_dtype_policy(previous_policy)


def two_replica_strategy():
    """One MirroredStrategy over 2 logical CPUs per process.

    A second MirroredStrategy on the same devices restarts its collective instance
    keys, and its collectives then clash with the first one's ("Shape mismatch in the
    collective instance"); every test must share this one.
    """
    if "strategy" not in _MIRRORED:
        _MIRRORED["strategy"] = tf.distribute.MirroredStrategy(TWO_CPUS)
    return _MIRRORED["strategy"]


def compare_one_vs_two_replicas(make_recipe, batch, state_fn=None, atol=None, rtol=None):
    """Asserts equal loss, gradients and (optionally) state after one train step.

    Default tolerances follow Keras' float type: the issue's ~1e-5 in float32, and
    1e-9 in float64, where one and two replicas agree to round-off (~1e-15).
    """
    float64 = keras.config.floatx() == "float64"
    atol = atol if atol is not None else (1e-9 if float64 else 1e-5)
    rtol = rtol if rtol is not None else (1e-7 if float64 else 1e-4)
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = two_replica_strategy()
    recipe_1 = build_recipe(one, make_recipe)
    recipe_2 = build_recipe(two, make_recipe, weights=recipe_1.get_weights())

    loss_1, grads_1 = loss_and_gradients(one, recipe_1, batch)
    loss_2, grads_2 = loss_and_gradients(two, recipe_2, batch)
    np.testing.assert_allclose(loss_2, loss_1, rtol=rtol, atol=atol)
    assert len(grads_1) == len(grads_2) > 0
    for g1, g2, v in zip(grads_1, grads_2, recipe_1.optimized_variables):
        np.testing.assert_allclose(g2, g1, rtol=rtol, atol=atol, err_msg=v.path)
    assert any(np.abs(g).max() > 0 for g in grads_1), "all gradients are zero: the test proves nothing"

    train_step(one, recipe_1, batch)
    train_step(two, recipe_2, batch)
    if state_fn is not None:
        for s1, s2 in zip(state_fn(recipe_1), state_fn(recipe_2)):
            np.testing.assert_allclose(np.asarray(s2), np.asarray(s1), rtol=rtol, atol=atol)
    return recipe_1, recipe_2
