"""DeepCluster: PCA-whitening and k-means against numpy references, empty clusters, loss
weights, the per-epoch re-clustering callback, distributed equality and learning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.base import get_recipe_class
from recipes.clustering.deepcluster import (SPLIT_EPS, kmeans, pca_whiten, preprocess_features,
                                            uniform_cluster_weights)
from tests.distributed_utils import build_recipe, compare_one_vs_two_replicas, float64, two_replica_strategy
from tests.encoders import small_encoder
from tests.test_recipes_ssl import _loss_drops_on_fixed_views, _trainables

SHAPE = (16, 16, 1)


def _images(n=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, *SHAPE)).astype("uint8")


def _deepcluster(**config):
    settings = dict(dataset_size=16, num_clusters=4, pca_dim=8, hidden_dim=16, feature_batch_size=8, bn_splits=2)
    return lambda: get_recipe_class("deepcluster")(small_encoder(SHAPE), **{**settings, **config})


# ---- the clustering's pure functions --------------------------------------------------
def test_pca_whitening_against_numpy_svd():
    """The top principal directions from an SVD of the centered data, scores divided by the
    singular values (unit variance): equal up to each component's sign; then L2 rows."""
    rng = np.random.RandomState(0)
    x = rng.randn(200, 6) @ rng.randn(6, 6) + rng.randn(6) * 3  # correlated, off-centre
    whitened = pca_whiten(x, 4)
    centered = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centered, full_matrices=False)
    reference = u[:, :4] * np.sqrt(len(x))  # = centered @ v / (s / sqrt(n))
    signs = np.sign(np.sum(whitened * reference, axis=0))
    np.testing.assert_allclose(whitened, reference * signs, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.cov(whitened.T, bias=True), np.eye(4), atol=1e-9)  # whitened
    processed = preprocess_features(x, 4)
    np.testing.assert_allclose(processed, whitened / np.linalg.norm(whitened, axis=1, keepdims=True), atol=1e-12)
    assert preprocess_features(x, 256).shape == (200, 6)  # capped at the feature dimension
    assert preprocess_features(x[:5], 256).shape == (5, 4)  # and at the rank of 5 centered points


def _lloyd_numpy(x, centroids, iterations):
    """Lloyd's algorithm written out point by point (no empty clusters in its test)."""
    centroids = centroids.copy()
    for _ in range(iterations + 1):
        assign = np.array([np.argmin([np.sum((p - c) ** 2) for c in centroids]) for p in x])
        if _ == iterations:
            return assign, centroids
        centroids = np.stack([x[assign == k].mean(axis=0) for k in range(len(centroids))])


def test_kmeans_against_numpy_lloyd():
    rng = np.random.RandomState(1)
    x = np.concatenate([rng.randn(40, 5) + rng.randn(5) * 4 for _ in range(4)])
    init = x[[0, 1, 2, 3, 50, 90, 130]]  # 7 clusters from a poor start, so the centroids move
    for iterations in (1, 3, 10):
        labels, centroids, splits = kmeans(x, 7, iterations, initial_centroids=init)
        labels_ref, centroids_ref = _lloyd_numpy(x, init, iterations)
        np.testing.assert_array_equal(labels, labels_ref)
        np.testing.assert_allclose(centroids, centroids_ref, rtol=1e-12, atol=1e-12)
        assert splits == 0
    # random initialization: K distinct data points, reproducible from the seed
    first, _, _ = kmeans(x, 7, 5, seed=[0, 3])
    np.testing.assert_array_equal(kmeans(x, 7, 5, seed=[0, 3])[0], first)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x[:3], 4)


def test_empty_cluster_takes_a_perturbed_copy_and_splits_its_points():
    """Cluster 2 starts far from every point and is empty after the first assignment; it takes
    cluster 0's centroid (the only one with 2+ points), each perturbed by (1 +- 1/1024) on
    alternate coordinates, and the final assignment splits cluster 0's four points between them."""
    x = np.array([[4.0, 6.0], [6.0, 4.0], [4.5, 5.5], [5.5, 4.5], [-5.0, -5.0]])
    init = np.array([[5.0, 5.0], [-5.0, -5.0], [100.0, -100.0]])
    labels, centroids, splits = kmeans(x, 3, 1, initial_centroids=init)
    assert splits == 1
    e = SPLIT_EPS
    np.testing.assert_allclose(centroids, [[5 * (1 - e), 5 * (1 + e)], [-5, -5], [5 * (1 + e), 5 * (1 - e)]],
                               rtol=1e-15)
    np.testing.assert_array_equal(labels, [0, 2, 0, 2, 1])  # x < y stays in 0, x > y goes to the copy
    # without the split the cluster would stay empty: one more iteration keeps all three filled
    labels, _, _ = kmeans(x, 3, 2, initial_centroids=init)
    assert set(labels) == {0, 1, 2}


def test_uniform_cluster_weights_equal_sampling_uniformly_over_clusters():
    labels = np.array([0, 0, 0, 1, 3, 3])  # cluster 2 empty: K_nonempty = 3
    weights = uniform_cluster_weights(labels, 4)
    np.testing.assert_allclose(weights, [2 / 3, 2 / 3, 2 / 3, 2, 1, 1])  # N / (3 |cluster|)
    # expected weighted loss of a uniformly drawn image = mean over clusters of their mean loss
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 9, 500)
    losses = rng.rand(500)
    weights = uniform_cluster_weights(labels, 10)
    per_cluster = [losses[labels == k].mean() for k in np.unique(labels)]
    np.testing.assert_allclose(np.mean(weights * losses), np.mean(per_cluster), rtol=1e-12)
    np.testing.assert_allclose(weights.sum(), 500)


# ---- the recipe -----------------------------------------------------------------------
def test_deepcluster_config_and_errors():
    recipe = _deepcluster()()
    config = recipe.get_config()
    assert (config["num_clusters"], config["pca_dim"], config["kmeans_iterations"], config["hidden_dim"]) == \
        (4, 8, 20, 16)
    assert config["view_policy"]["jitter_p"] == 0.0 and config["view_policy"]["flip"]
    assert recipe.embedding_head() is recipe.head and get_recipe_class("deepcluster").needs_index
    assert _deepcluster(hidden_dim=0)().embedding_head() is None
    with pytest.raises(ValueError, match="exceeds the 16 images"):
        _deepcluster(num_clusters=17)()
    with pytest.raises(ValueError, match="num_clusters >= 2"):
        _deepcluster(num_clusters=1)()
    with pytest.raises(ValueError, match="pca_dim >= 1"):
        _deepcluster(pca_dim=0)()
    with pytest.raises(ValueError, match="all 16 training images"):
        recipe.cluster(_images(8))


def test_deepcluster_refuses_to_train_before_clustering():
    recipe = _deepcluster()()
    recipe.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="pseudo-labels were never computed"):
        recipe.train_step({"image": tf.constant(_images(16)), "index": tf.range(16)})


def _with_clusters(recipe, labels, weights):
    recipe.labels.assign(labels)
    recipe.sample_weights.assign(weights)
    return recipe


def test_deepcluster_loss_is_the_weighted_cross_entropy_of_each_images_cluster():
    """Loss = sum_i w[index_i] CE(logits_i, labels[index_i]) / B, gathered by dataset index."""
    from recipes.augment import random_view

    with float64():
        recipe = _deepcluster(dropout=0.0)()
        recipe.compile(optimizer=keras.optimizers.SGD(0.1))
        recipe.optimizer.build(recipe.optimized_variables)
        labels = np.array([3, 0, 1, 2, 2, 1, 0, 3, 1, 1, 0, 0, 0, 2, 3, 3], np.int32)
        weights = np.linspace(0.5, 2.0, 16)
        _with_clusters(recipe, labels, weights)
        images, index = _images(16), np.random.RandomState(3).permutation(16)
        loss, _ = recipe.loss_terms({"image": tf.constant(images), "index": tf.constant(index)})
        views = random_view(tf.constant(images), recipe.step_seed(1), recipe.view_policy, 16)
        logits = recipe.head_logits(recipe.encode_in_groups(
            lambda x, training: recipe.encoder(x, training=training), views, 2)).numpy()
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        expected = -np.sum(weights[index] * log_probs[np.arange(16), labels[index]]) / 16
        np.testing.assert_allclose(float(loss), expected, rtol=1e-12)


def test_dropout_drops_the_inputs_of_the_fc_layers_only_in_training():
    """The paper's AlexNet: Dropout(0.5) before fc6 and fc7, none before the top layer. In numpy:
    the head's Dense layers on inputs masked by the drawn global-batch masks, kept units x 2;
    without draws (the clustering's features, evaluation) nothing is dropped."""
    from recipes.augment import GlobalDraws

    with float64():
        recipe = _deepcluster()()
        assert recipe.get_config()["dropout"] == 0.5
        features = np.random.RandomState(4).normal(size=(6, recipe.encoder.output_shape[-1]))
        seed = tf.constant([5, 6], tf.int32)
        logits = recipe.head_logits(tf.constant(features), GlobalDraws(seed, 6, 6)).numpy()

        masks = GlobalDraws(seed, 6, 6)
        (w1, b1), (w2, b2) = [(d.kernel.numpy(), d.bias.numpy()) for d in recipe.head.layers
                              if isinstance(d, keras.layers.Dense)]
        keep1 = masks.uniform(shape=(w1.shape[0],)).numpy() >= 0.5
        hidden = np.maximum((features * keep1 * 2.0) @ w1 + b1, 0.0)
        keep2 = masks.uniform(shape=(w2.shape[0],)).numpy() >= 0.5
        top = np.maximum((hidden * keep2 * 2.0) @ w2 + b2, 0.0)
        expected = top @ recipe.classifier.kernel.numpy() + recipe.classifier.bias.numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-10)
        assert 0.2 < keep1.mean() < 0.8  # some units dropped, some kept
        undropped = np.maximum(np.maximum(features @ w1 + b1, 0.0) @ w2 + b2, 0.0)
        np.testing.assert_allclose(recipe.head_logits(tf.constant(features)).numpy(),
                                   undropped @ recipe.classifier.kernel.numpy() + recipe.classifier.bias.numpy(),
                                   rtol=1e-10)
    with pytest.raises(ValueError, match="dropout must be in"):
        _deepcluster(dropout=1.0)()


def test_deepcluster_clustering_and_train_step_one_vs_two_replicas():
    """The clustering (cross-replica, one device) gives the same labels under either strategy;
    the weighted train step, dropout included (global-batch masks), then matches in loss,
    gradients and weights, and learns."""
    images = _images(16)
    batch = {"image": images, "index": np.arange(16)[::-1].copy()}
    with float64():
        one = build_recipe(tf.distribute.OneDeviceStrategy("/cpu:0"), _deepcluster())
        labels = one.cluster(images, epoch=1)["labels"]
        assert labels.shape == (16,) and labels.min() >= 0
        mirrored = build_recipe(two_replica_strategy(), _deepcluster(), weights=one.get_weights())
        with two_replica_strategy().scope():
            np.testing.assert_array_equal(mirrored.cluster(images, epoch=1)["labels"], labels)
        np.testing.assert_allclose(mirrored.classifier.kernel.numpy(), one.classifier.kernel.numpy())
        # unequal clusters, so the weights are not all 1 and the test sees them
        labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], np.int32)
        weights = uniform_cluster_weights(labels, 4)
        recipe, _ = compare_one_vs_two_replicas(
            lambda: _with_clusters(_deepcluster()(), labels, weights), batch,
            state_fn=lambda r: _trainables(r) + [r.classifier.kernel.value])
        _loss_drops_on_fixed_views(recipe, batch)


def test_callback_reclusters_every_epoch_and_resets_the_classifier():
    images = _images(16)
    recipe = _deepcluster()()
    recipe.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    seen = []
    original = recipe.cluster

    def cluster(x, epoch=0):
        trained = recipe.classifier.kernel.numpy().copy()
        result = original(x, epoch)
        seen.append((epoch, trained, recipe.classifier.kernel.numpy().copy(), recipe.labels.numpy().copy(),
                     [s.numpy().copy() for s in recipe.classifier_slots()]))
        return result

    recipe.cluster = cluster
    dataset = tf.data.Dataset.from_tensors({"image": images, "index": np.arange(16)}).repeat()
    recipe.fit(dataset, epochs=3, steps_per_epoch=2, verbose=0, callbacks=recipe.training_callbacks(images))
    assert [s[0] for s in seen] == [0, 1, 2]
    for epoch, trained, reset, labels, slots in seen:
        assert labels.min() >= 0 and labels.max() < 4
        np.testing.assert_allclose(reset, 0.01 * tf.random.stateless_normal(
            reset.shape, tf.constant([0, 1000003 + epoch], tf.int32), dtype=reset.dtype).numpy())
        if epoch:  # trained for an epoch, then re-initialized: weights and momentum fresh again
            assert np.abs(trained - reset).max() > 1e-4
            assert len(slots) == 2 and all(np.all(s == 0) for s in slots)
    assert np.abs(recipe.classifier.bias.numpy()).max() > 0  # training moved it after the last reset
    encoder_slots = [s for s in recipe.optimizer.variables if "momentum" in s.name and s.name.startswith("conv2d")]
    assert encoder_slots and all(np.abs(s.numpy()).max() > 0 for s in encoder_slots)  # the encoder's stay
    # a resumed run re-clusters an epoch exactly as the original did
    first = recipe.cluster(images, epoch=5)["labels"]
    np.testing.assert_array_equal(recipe.cluster(images, epoch=5)["labels"], first)
