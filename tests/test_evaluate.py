"""kNN and linear probe against independent references; the classifier report against hand counts."""

import numpy as np
import pytest

from recipes import evaluate


def _reference_weighted_knn(train, train_labels, test, num_classes, k, temperature):
    """Plain-loop version of the InstDisc weighted kNN."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    predictions = []
    for row in test:
        similarity = train @ row
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_labels[i]] += np.exp(similarity[i] / temperature)
        predictions.append(np.argmax(votes))
    return np.array(predictions)


def test_knn_matches_reference_on_random_features():
    rng = np.random.RandomState(0)
    train = rng.randn(300, 8).astype(np.float32)
    labels = rng.randint(0, 4, 300)
    test = rng.randn(50, 8).astype(np.float32)
    for k, temperature in ((1, 0.1), (20, 0.1), (200, 0.5)):
        expected = _reference_weighted_knn(train, labels, test, 4, k, temperature)
        got = evaluate.knn_predict(train, labels, test, 4, k=k, temperature=temperature, chunk=16)
        np.testing.assert_array_equal(got, expected)


def test_knn_accuracy_carries_protocol_and_separates_clusters():
    rng = np.random.RandomState(1)
    centers = rng.randn(3, 16) * 5
    labels = rng.randint(0, 3, 400)
    features = centers[labels] + rng.randn(400, 16)
    result = evaluate.knn_accuracy(features[:300], labels[:300], features[300:], labels[300:], 3,
                                   protocol={"dataset": "toy"})
    assert result["accuracy"] > 0.95
    assert result["protocol"]["k"] == 200 and result["protocol"]["temperature"] == 0.1
    assert result["protocol"]["dataset"] == "toy"
    small = evaluate.knn_accuracy(features[:50], labels[:50], features[300:], labels[300:], 3)
    assert small["protocol"]["k"] == 50  # a memory smaller than k: the protocol says the k used


def test_linear_probe_learns_linearly_separable_classes_and_not_noise():
    rng = np.random.RandomState(2)
    features = rng.randn(600, 10).astype(np.float32)
    labels = (features[:, 0] + features[:, 1] > 0).astype(np.int64)
    result = evaluate.linear_probe(features[:500], labels[:500], features[500:], labels[500:], 2, epochs=50,
                                   learning_rate=0.05)
    assert result["accuracy"] > 0.9
    noise_labels = rng.randint(0, 2, 600)
    chance = evaluate.linear_probe(features[:500], noise_labels[:500], features[500:], noise_labels[500:], 2, learning_rate=0.05,
                                   epochs=30)
    assert chance["accuracy"] < 0.7


def test_evaluate_encoder_reports_knn_on_the_embedding_head():
    """Features: 2 noise dims + 2 class dims. A head keeping the class dims must score high, one
    keeping the noise dims near chance, so the reported number is the head's, with its protocol."""
    import keras

    rng = np.random.RandomState(0)
    labels = rng.randint(0, 2, 400)
    centres = np.array([[1.0, -1.0], [-1.0, 1.0]])
    features = np.concatenate([rng.normal(size=(400, 2)), centres[labels] + 0.3 * rng.normal(size=(400, 2))],
                              axis=1).astype("float32")
    encoder = keras.Sequential([keras.Input((4,)), keras.layers.Identity()])

    def head(keep):
        layer = keras.layers.Dense(2, use_bias=False)
        layer.build((None, 4))
        layer.set_weights([np.eye(4, dtype="float32")[:, keep]])
        return layer

    def evaluate_with(keep):
        return evaluate.evaluate_encoder(encoder, features[:300], labels[:300], features[300:], labels[300:], 2,
                                         knn_k=20, probe_epochs=0, embedding_head=head(keep))

    on_class_dims, on_noise_dims = evaluate_with([2, 3]), evaluate_with([0, 1])
    assert on_class_dims["knn_embedding"]["accuracy"] > 0.95
    assert on_noise_dims["knn_embedding"]["accuracy"] < 0.7
    assert on_class_dims["knn"]["accuracy"] == on_noise_dims["knn"]["accuracy"]  # encoder features unchanged
    assert "projection-head output" in on_class_dims["knn_embedding"]["protocol"]["features"]
    assert "knn_embedding" not in evaluate.evaluate_encoder(encoder, features, labels, features, labels, 2,
                                                            knn_k=20, probe_epochs=0)


def test_classification_report_counts_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    predicted = [0, 1, 1, 1, 1, 0]
    report = evaluate.classification_report(labels, predicted, num_classes=4)
    assert report["confusion"] == [[1, 2, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert report["per_class_recall"] == [pytest.approx(1 / 3, abs=1e-4), 1.0, 0.0, None]  # class 3: no examples
    assert report["accuracy"] == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="5 labels but 6 predictions"):
        evaluate.classification_report(labels[:5], predicted, num_classes=4)


def test_feature_extractor_traces_the_encoder_once_for_every_split_and_partial_batch():
    """The train split, the test split and a last partial batch share one graph (KnnMonitor
    extracts both splits every epoch; each new trace of a ResNet costs seconds)."""
    import tensorflow as tf

    traces = []

    def encoder(batch, training):
        traces.append(training)  # runs only while tracing
        return tf.reduce_mean(batch, axis=[1, 2])

    extract = evaluate.feature_extractor(encoder, batch_size=8)
    images = np.random.RandomState(0).uniform(0, 255, (21, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(extract(images), images.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(extract(images[:5]), images[:5].mean(axis=(1, 2)), rtol=1e-5)
    assert traces == [False]  # one trace, in inference mode
