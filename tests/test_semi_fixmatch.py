"""FixMatch: 1-vs-2-replica equality, EMA update, loss decomposition, batch pipeline."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.semi.fixmatch import FixMatch, fixmatch_dataset, run_fixmatch
from tests import distributed_utils
from tests.distributed_utils import build_recipe, compare_one_vs_two_replicas, train_step
from tests.encoders import small_encoder
from tests.test_semi_self_training import _shapes

NUM_CLASSES = 3


def _batch(batch=4, mu=2, seed=0):
    rng = np.random.RandomState(seed)
    return {"image": rng.randint(0, 256, (batch, 16, 16, 1)).astype("uint8"),
            "label": rng.randint(0, NUM_CLASSES, batch).astype("int64"),
            "unlabelled_image": rng.randint(0, 256, (mu * batch, 16, 16, 1)).astype("uint8")}


def _make_fixmatch(**overrides):
    def make():
        encoder = small_encoder()
        # threshold 0.3 with 3 classes: some, not all, pseudo-labels pass at initialization.
        config = dict(mu=2, threshold=0.3, ema_decay=0.9, bn_splits=2)
        config.update(overrides)
        return FixMatch(encoder, NUM_CLASSES, **config)
    return make


def _distribute_rows_per_tensor(strategy, batch):
    """Replica r gets rows [r*n/R, (r+1)*n/R) of each tensor, n counted per tensor.

    The shared `distribute_batch` slices every tensor by the first tensor's row
    count, which would hand out mu*B unlabelled rows as if there were B.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return batch

    def value_fn(context):
        r = context.replica_id_in_sync_group
        return {k: tf.constant(v[r * (len(v) // replicas):(r + 1) * (len(v) // replicas)])
                for k, v in batch.items()}

    return strategy.experimental_distribute_values_from_function(value_fn)


def test_one_vs_two_replicas_equal_loss_gradients_and_ema(monkeypatch):
    monkeypatch.setattr(distributed_utils, "distribute_batch", _distribute_rows_per_tensor)
    compare_one_vs_two_replicas(_make_fixmatch(), _batch(), state_fn=_ema_parameters)


def test_one_vs_two_replicas_with_distribution_alignment(monkeypatch):
    """The running mean prediction is over the global batch, so both runs hold the same history."""
    monkeypatch.setattr(distributed_utils, "distribute_batch", _distribute_rows_per_tensor)
    compare_one_vs_two_replicas(_make_fixmatch(distribution_alignment=True, alignment_window=2), _batch(),
                                state_fn=lambda r: _ema_parameters(r) + [r.prediction_history.value])


def test_distribution_alignment_keeps_the_last_window_of_batch_means():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    recipe = build_recipe(strategy, _make_fixmatch(distribution_alignment=True, alignment_window=2))
    uniform = np.full((2, NUM_CLASSES), 1 / NUM_CLASSES, np.float32)
    np.testing.assert_allclose(recipe.prediction_history.numpy(), uniform)
    rows = []
    for step in range(3):
        train_step(strategy, recipe, _batch(seed=step))
        rows.append(recipe.prediction_history.numpy().copy())
    np.testing.assert_allclose(rows[0].sum(axis=1), [1, 1], rtol=1e-5)  # mean predictions are distributions
    assert not np.allclose(rows[0][0], uniform[0]) and np.allclose(rows[0][1], uniform[1])  # slot 0 first
    np.testing.assert_array_equal(rows[1][0], rows[0][0])
    assert not np.allclose(rows[1][1], uniform[1])                                       # then slot 1
    np.testing.assert_array_equal(rows[2][1], rows[1][1])
    assert not np.allclose(rows[2][0], rows[1][0])                                       # then slot 0 again


def _losses_with_the_same_weights(make_first, make_second):
    """The two recipes' losses on one batch, the second given the first's encoder and classifier."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    batch = {k: tf.constant(v) for k, v in _batch().items()}
    first, second = build_recipe(strategy, make_first), build_recipe(strategy, make_second)
    for source, target in ((first.encoder, second.encoder), (first.classifier, second.classifier)):
        target.set_weights(source.get_weights())
    return [float(recipe.loss_and_gradients(batch)[0]) for recipe in (first, second)]


def test_alignment_changes_the_loss_and_needs_a_positive_window():
    plain_loss, aligned_loss = _losses_with_the_same_weights(
        _make_fixmatch(), _make_fixmatch(distribution_alignment=True, alignment_window=1))
    assert plain_loss != pytest.approx(aligned_loss, rel=1e-4)
    with pytest.raises(ValueError, match="alignment_window"):
        FixMatch(small_encoder(), NUM_CLASSES, distribution_alignment=True, alignment_window=0)


def test_alignment_target_is_the_labelled_class_distribution():
    keras.utils.set_random_seed(0)
    (images, labels), (unlabelled, _) = _shapes(12, seed=1), _shapes(24, seed=2)
    labels = np.array([0] * 6 + [1] * 4 + [2] * 2)  # imbalanced labelled set: p(y) = (1/2, 1/3, 1/6)
    model, _ = run_fixmatch(small_encoder(), 3, (images, labels), unlabelled, steps=1, batch_size=4, mu=2,
                            distribution_alignment=True)
    np.testing.assert_allclose(model.alignment_target, [1 / 2, 1 / 3, 1 / 6])
    assert model.get_config()["alignment_target"] == model.alignment_target  # the card records it
    given, _ = run_fixmatch(small_encoder(), 3, (images, labels), unlabelled, steps=1, batch_size=4, mu=2,
                            distribution_alignment=True, alignment_target=[1, 1, 2])
    np.testing.assert_allclose(given.alignment_target, [1 / 4, 1 / 4, 1 / 2])  # a given target wins
    plain, _ = run_fixmatch(small_encoder(), 3, (images, labels), unlabelled, steps=1, batch_size=4, mu=2)
    assert plain.alignment_target is None


def test_the_alignment_target_enters_the_loss():
    uniform_loss, skewed_loss = _losses_with_the_same_weights(
        _make_fixmatch(distribution_alignment=True),
        _make_fixmatch(distribution_alignment=True, alignment_target=[8, 1, 1]))
    assert uniform_loss != pytest.approx(skewed_loss, rel=1e-4)
    with pytest.raises(ValueError, match="3 non-negative weights"):
        FixMatch(small_encoder(), NUM_CLASSES, distribution_alignment=True, alignment_target=[1, 1])


def _ema_parameters(recipe):
    """EMA copies of the trainable weights.

    BN moving statistics are left out on purpose: one device updates them group
    after group, N replicas average their per-group updates; both are fine for
    inference, but they are not the same numbers.
    """
    pairs = [(recipe.encoder, recipe.ema_encoder), (recipe.classifier, recipe.ema_classifier)]
    return [e.value for online, ema in pairs for o, e in zip(online.weights, ema.weights) if o.trainable]


def test_loss_is_supervised_plus_weighted_unsupervised():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    batch = _batch()
    losses = {}
    for lambda_u in (0.0, 1.0, 3.0):
        recipe = build_recipe(strategy, _make_fixmatch(lambda_u=lambda_u))
        if lambda_u == 0.0:
            weights = recipe.get_weights()
        else:
            recipe.set_weights(weights)
        loss, _, _ = recipe.loss_and_gradients({k: tf.constant(v) for k, v in batch.items()})
        losses[lambda_u] = float(loss)
    unsupervised = losses[1.0] - losses[0.0]
    assert unsupervised > 0, "the test needs some pseudo-labels above the threshold"
    np.testing.assert_allclose(losses[3.0], losses[0.0] + 3 * unsupervised, rtol=1e-4)


def test_ema_follows_online_weights_after_a_step():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    recipe = build_recipe(strategy, _make_fixmatch(ema_decay=0.9))
    ema_before = [w.numpy() for w in recipe.ema_classifier.weights]
    train_step(strategy, recipe, _batch())
    online = [w.numpy() for w in recipe.classifier.weights]
    for e_before, e_after, o in zip(ema_before, recipe.ema_classifier.weights, online):
        np.testing.assert_allclose(e_after.numpy(), 0.9 * e_before + 0.1 * o, rtol=1e-5, atol=1e-6)


def test_wrong_unlabelled_ratio_is_explained():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    recipe = build_recipe(strategy, _make_fixmatch(mu=3))
    with pytest.raises(ValueError, match="mu"):
        recipe.loss_and_gradients({k: tf.constant(v) for k, v in _batch(mu=2).items()})


def test_fixmatch_dataset_batches():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (10, 16, 16, 1)).astype("uint8")
    labels = rng.randint(0, 3, 10).astype("int64")
    unlabelled = rng.randint(0, 256, (30, 16, 16, 1)).astype("uint8")
    batch = next(iter(fixmatch_dataset(images, labels, unlabelled, batch_size=4, mu=3)))
    assert batch["image"].shape == (4, 16, 16, 1) and batch["image"].dtype == tf.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == tf.int64
    assert batch["unlabelled_image"].shape == (12, 16, 16, 1)
    assert "unlabelled_label" not in batch


def test_fit_runs_and_reports_fixmatch_metrics():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    recipe = build_recipe(strategy, _make_fixmatch(bn_splits=None))
    rng = np.random.RandomState(0)
    ds = fixmatch_dataset(rng.randint(0, 256, (8, 16, 16, 1)).astype("uint8"), rng.randint(0, 3, 8),
                          rng.randint(0, 256, (16, 16, 16, 1)).astype("uint8"), batch_size=4, mu=2,
                          unlabelled_labels=rng.randint(0, 3, 16))
    logs = recipe.fit(ds, steps_per_epoch=2, epochs=1, verbose=0).history
    assert {"loss", "supervised_loss", "unsupervised_loss", "mask_rate", "pseudo_label_accuracy"} <= set(logs)
    images = rng.randint(0, 256, (5, 16, 16, 1)).astype("uint8")
    assert recipe.predict_proba(images).shape == (5, 3)
    assert recipe.exported_encoder is recipe.ema_encoder
    # The published classifier is the EMA model (the online one has moved away from it by now).
    np.testing.assert_allclose(recipe.exported_classifier(images.astype("float32")), recipe.predict_proba(images),
                               rtol=1e-5, atol=1e-6)
    assert recipe.get_config()["threshold"] == 0.3


def test_run_fixmatch_logs_test_accuracy_every_few_epochs_and_at_the_end():
    keras.utils.set_random_seed(0)
    labelled, (unlabelled, _), test = _shapes(12, seed=1), _shapes(24, seed=2), _shapes(30, seed=3)
    encoder = small_encoder()
    model, metrics = run_fixmatch(encoder, 3, labelled, unlabelled, test, steps=10, log_every=2, test_every=2,
                                  batch_size=4, mu=2, threshold=0.3)
    steps = [step for step, _ in metrics["test_accuracy_by_step"]]
    assert steps == [4, 8, 10]  # every 2nd epoch of 2 steps, and the last one
    assert metrics["test_accuracy_by_step"][-1][1] == metrics["test_accuracy"] == model.accuracy(*test)
