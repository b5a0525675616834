"""Clustering recipes (SwAV, SeLa): Sinkhorn-Knopp against numpy, distributed equality, learning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.base import get_recipe_class
from tests.distributed_utils import compare_one_vs_two_replicas, float64
from tests.encoders import small_encoder
from tests.test_recipes_ssl import _loss_drops_on_fixed_views, _trainables

SHAPE = (16, 16, 1)


def _swav(**config):
    settings = dict(num_prototypes=12, hidden_dim=16, projection_dim=8, num_local_crops=2, bn_splits=2)
    return lambda: get_recipe_class("swav")(small_encoder(SHAPE), **{**settings, **config})


def _images(n=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, *SHAPE)).astype("uint8")


def test_swav_one_vs_two_replicas_with_the_queue_in_use_and_frozen_prototypes():
    """queue_start_step=-2: the 32-row queue counts as full from step 0, so the Sinkhorn sums
    mix shared queue rows (counted once) with each replica's batch rows (summed over replicas)."""
    with float64():
        recipe, _ = compare_one_vs_two_replicas(
            _swav(queue_size=32, queue_start_step=-2, freeze_prototypes_steps=5), {"image": _images(16)},
            state_fn=lambda r: [q.keys.value for q in r.queues] + [r.prototypes.kernel.value] + _trainables(r))
    keys = recipe.queues[0].keys.numpy()
    np.testing.assert_allclose(np.linalg.norm(keys[:16], axis=1), 1.0, rtol=1e-6)  # this step's embeddings
    # one step was taken: the prototypes were normalized before it and, frozen, not moved by it
    np.testing.assert_allclose(np.linalg.norm(recipe.prototypes.kernel.numpy(), axis=0), 1.0, rtol=1e-9)


def test_swav_learns_on_fixed_views():
    with float64():
        _loss_drops_on_fixed_views(_swav()(), {"image": _images(16)})


# ---- SeLa ----------------------------------------------------------------------------

def _sela_numpy(probs, lam):
    """The paper's label step as its authors wrote it down: multiplicative Sinkhorn-Knopp on
    P^lambda (K x N) until the image scalings settle, then each image's argmax."""
    p = probs.T.astype(np.float64) ** lam
    k, n = p.shape
    r, c = np.ones((k, 1)) / k, np.ones((n, 1)) / n
    for _ in range(100000):
        r = (1.0 / k) / (p @ c)
        c_new = (1.0 / n) / (r.T @ p).T
        settled = np.abs(c / c_new - 1).sum() < 1e-10
        c = c_new
        if settled:
            break
    q = (p * c.T) * r
    return q.T, q.argmax(axis=0)


def test_self_label_assignments_against_the_papers_algorithm_in_numpy():
    from recipes.losses import self_label_assignments

    rng = np.random.RandomState(0)
    logits = rng.randn(60, 5) * 2.0
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    for lam in (1.0, 3.0):
        labels, log_q = self_label_assignments(log_probs, lam, tolerance=1e-12)
        q_ref, labels_ref = _sela_numpy(np.exp(log_probs), lam)
        np.testing.assert_allclose(np.exp(log_q), q_ref, rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(labels, labels_ref)
        q = np.exp(log_q.numpy())
        np.testing.assert_allclose(q.sum(axis=0), 1 / 5, rtol=1e-6)   # every cluster 1/K of the mass
        np.testing.assert_allclose(q.sum(axis=1), 1 / 60, rtol=1e-6)  # every image 1/N


def test_self_labels_split_the_images_equally_where_argmax_would_not():
    """Predictions that favour cluster 0 for nearly every image: argmax collapses, the label
    step still gives each of the K clusters about N/K images, at lambda=25 in float64."""
    from recipes.losses import self_label_assignments

    rng = np.random.RandomState(1)
    logits = rng.randn(800, 8) * 0.5
    logits[:, 0] += 3.0
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert np.bincount(log_probs.argmax(axis=1), minlength=8)[0] > 700
    labels, _ = self_label_assignments(log_probs, 25.0)
    counts = np.bincount(labels.numpy(), minlength=8)
    assert counts.min() >= 80 and counts.max() <= 120, counts  # 100 each under exact equipartition


def _sela(**config):
    settings = dict(dataset_size=16, num_clusters=4, num_heads=2, num_label_updates=2, total_steps=4,
                    label_batch_size=8, bn_splits=2)
    return lambda: get_recipe_class("sela")(small_encoder(SHAPE), **{**settings, **config})


def test_sela_label_schedule_spreads_label_steps_over_the_run():
    assert _sela(num_label_updates=4, total_steps=10)().label_schedule() == [0, 2, 5, 7]
    assert _sela(num_label_updates=100, total_steps=3)().label_schedule() == [0, 1, 2]
    with pytest.raises(ValueError, match="total_steps"):
        _sela(total_steps=None)().label_schedule()
    with pytest.raises(ValueError, match="exceeds the 16 images"):
        _sela(num_clusters=17)()


def test_sela_label_step_and_train_step_one_vs_two_replicas():
    """The label step (cross-replica, one device) gives the same labels under either strategy,
    and the representation step then matches in loss, gradients and weights."""
    from tests.distributed_utils import build_recipe, two_replica_strategy

    images = _images(16)
    batch = {"image": images, "index": np.arange(16)[::-1].copy()}
    with float64():
        labelled = build_recipe(tf.distribute.OneDeviceStrategy("/cpu:0"), _sela())
        labels = labelled.assign_labels(images, update=1)
        assert labels.shape == (2, 16) and labels.min() >= 0
        mirrored = build_recipe(two_replica_strategy(), _sela(), weights=labelled.get_weights())
        with two_replica_strategy().scope():
            np.testing.assert_array_equal(mirrored.assign_labels(images, update=1), labels)
        recipe, _ = compare_one_vs_two_replicas(
            lambda: _with_labels(_sela()(), labels), batch, state_fn=_trainables)
        assert recipe.get_config()["num_clusters"] == 4
        _loss_drops_on_fixed_views(recipe, batch)


def _with_labels(recipe, labels):
    recipe.labels.assign(labels)
    return recipe


def test_sela_refuses_to_train_before_its_first_label_step():
    recipe = _sela()()
    recipe.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels were never computed"):
        recipe.train_step({"image": tf.constant(_images(16)), "index": tf.range(16)})


def test_sela_callback_runs_the_label_step_on_schedule_and_on_an_unlabelled_resume(monkeypatch):
    images = _images(16)
    recipe = _sela(num_label_updates=2, total_steps=4)()
    calls = []
    original = recipe.assign_labels
    monkeypatch.setattr(recipe, "assign_labels", lambda x, update=0: calls.append(update) or original(x, update))
    recipe.compile(optimizer=keras.optimizers.SGD(0.01))
    dataset = tf.data.Dataset.from_tensors({"image": images, "index": np.arange(16)}).repeat()
    recipe.fit(dataset, epochs=2, steps_per_epoch=2, verbose=0, callbacks=recipe.training_callbacks(images))
    assert calls == [0, 1]  # before steps 0 and 2
    before = recipe.labels.numpy().copy()
    recipe.labels.assign(np.full((2, 16), -1, np.int32))  # as if resumed from a checkpoint without labels
    recipe.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, callbacks=recipe.training_callbacks(images))
    assert calls == [0, 1, 1] and recipe.labels.numpy().min() >= 0 and before.shape == (2, 16)
    with pytest.raises(ValueError, match="all 16 training images"):
        recipe.assign_labels(images[:8])


def test_self_labels_stay_finite_when_a_cluster_is_unlikely_for_every_image():
    """A cluster at 1e-26 for every image: P^25 is 0 in float64 and, unfloored, its scaling
    divides by zero (NaN labels); floored, the soft labels keep their marginals."""
    from recipes.losses import self_label_assignments

    rng = np.random.RandomState(2)
    logits = rng.randn(40, 4)
    logits[:, 2] -= 60.0
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    labels, log_q = self_label_assignments(log_probs, 25.0)
    q = np.exp(log_q.numpy())
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q.sum(axis=0), 1 / 4, rtol=1e-5)
    np.testing.assert_allclose(q.sum(axis=1), 1 / 40, rtol=1e-5)
    assert set(labels.numpy()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("recipe, config", [("npid", {"dataset_size": 16}), ("sela", {"dataset_size": 16, "num_clusters": 4}),
                                            ("deepcluster", {"dataset_size": 16, "num_clusters": 4})])
def test_recipes_with_per_image_state_ask_for_the_dataset_index_by_name(recipe, config):
    model = get_recipe_class(recipe)(small_encoder(SHAPE), **config)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=r"needs each image's dataset index.*with_index=True"):
        model.loss_terms({"image": tf.constant(_images(16))})
