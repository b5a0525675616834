"""How a frozen encoder is judged: weighted kNN and a linear probe.

* Weighted kNN (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
  Instance Discrimination", sec. 3.4): L2-normalized features; each test image
  takes its k most cosine-similar training images, each voting for its class with
  weight exp(similarity / T); k=200, T=0.1 by default. No training, so it measures
  the representation and not an optimizer.
  InstDisc classified with its 128-d embedding, the vector the loss compares; a
  recipe's `embedding_head()` gives that vector, and runs report kNN on it
  (`knn_embedding`) beside kNN on the encoder's pooled features (`knn`).
* Linear probe: a softmax classifier trained on frozen, standardized features.
* For classifiers (the label recipes): accuracy with its confusion matrix and
  per-class recall, which say *which* classes few labels leave confused.

Every result carries its protocol (dataset/split, k and T or probe settings, seed)
so a number never travels without the way it was measured.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def feature_extractor(encoder: keras.Model, batch_size: int = 512):
    """A function images -> encoder features in inference mode (BatchNorm uses moving statistics).

    It traces the encoder once, with a free batch dimension, and reuses that graph for every
    call: the train and the test split, every epoch of a `KnnMonitor`, a last partial batch.
    """
    graphs = {}

    def extract(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        key = (images.shape[1:], images.dtype)
        if key not in graphs:
            spec = tf.TensorSpec([None, *images.shape[1:]], images.dtype)
            graphs[key] = tf.function(lambda batch: encoder(batch, training=False), input_signature=[spec])
        embed = graphs[key]
        outputs = [embed(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(outputs, axis=0).astype(np.float32)

    return extract


def extract_features(encoder: keras.Model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Encoder features of `images` in inference mode; `feature_extractor` for several calls."""
    return feature_extractor(encoder, batch_size)(images)


def _normalize(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1, chunk=1024):
    """Class predictions by temperature-weighted voting of the k nearest neighbours."""
    train = tf.constant(_normalize(train_features))
    labels = tf.constant(np.asarray(train_labels, np.int64))
    k = min(k, len(train_features))
    predictions = []
    for start in range(0, len(test_features), chunk):
        test = tf.constant(_normalize(test_features[start : start + chunk]))
        similarity = tf.matmul(test, train, transpose_b=True)
        top_similarity, top_index = tf.math.top_k(similarity, k=k)
        weights = tf.exp(top_similarity / temperature)
        votes = tf.one_hot(tf.gather(labels, top_index), num_classes) * weights[..., None]
        predictions.append(tf.argmax(tf.reduce_sum(votes, axis=1), axis=1).numpy())
    return np.concatenate(predictions)


def classification_report(labels, predicted, num_classes) -> dict:
    """Accuracy, confusion matrix (rows: true class, columns: predicted) and per-class recall."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"{len(labels)} labels but {len(predicted)} predictions.")
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    recall = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    return {"accuracy": float(np.mean(labels == predicted)), "confusion": confusion.tolist(),
            "per_class_recall": [None if np.isnan(r) else round(float(r), 4) for r in recall]}


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                 k=200, temperature=0.1, protocol=None) -> dict:
    """Weighted kNN accuracy with its protocol."""
    predicted = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    accuracy = float(np.mean(predicted == np.asarray(test_labels)))
    return {"accuracy": accuracy,
            "protocol": {"method": "weighted_knn", "k": int(min(k, len(train_features))),  # the k used
                         "temperature": float(temperature),
                         "features": "l2-normalized pooled encoder output",
                         "train_size": int(len(train_features)), "test_size": int(len(test_features)),
                         **(protocol or {})}}


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes,
                 epochs=100, batch_size=256, learning_rate=1e-3, weight_decay=1e-4, seed=0,
                 protocol=None) -> dict:
    """Accuracy of a softmax classifier trained on frozen, standardized features (AdamW)."""
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    mean = train_features.mean(axis=0, keepdims=True)
    std = train_features.std(axis=0, keepdims=True) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    keras.utils.set_random_seed(seed)
    classifier = keras.Sequential([keras.Input((x_train.shape[1],)), keras.layers.Dense(num_classes)])
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    classifier.compile(
        optimizer=keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(learning_rate, steps),
                                         weight_decay=weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    classifier.fit(x_train, np.asarray(train_labels), epochs=epochs, batch_size=batch_size, verbose=0)
    accuracy = float(np.mean(np.argmax(classifier.predict(x_test, batch_size=1024, verbose=0), 1)
                             == np.asarray(test_labels)))
    return {"accuracy": accuracy,
            "protocol": {"method": "linear_probe", "optimizer": "AdamW", "epochs": int(epochs),
                         "batch_size": int(batch_size), "learning_rate": float(learning_rate),
                         "weight_decay": float(weight_decay), "features": "standardized frozen encoder output",
                         "seed": int(seed), "train_size": int(len(x_train)), "test_size": int(len(x_test)),
                         **(protocol or {})}}


def head_features(head, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """`head` (e.g. a projection MLP) applied to precomputed encoder features, in inference mode."""
    outputs = [np.asarray(head(tf.constant(features[i : i + batch_size]), training=False))
               for i in range(0, len(features), batch_size)]
    return np.concatenate(outputs, axis=0).astype(np.float32)


EMBEDDING_FEATURES = "l2-normalized embedding: the recipe's projection-head output (InstDisc protocol)"


def embedding_knn_accuracy(head, train_features, train_labels, test_features, test_labels, num_classes,
                           k=200, temperature=0.1, protocol=None) -> dict:
    """Weighted kNN on `head`'s output for precomputed encoder features (the recipe's embedding)."""
    return knn_accuracy(head_features(head, train_features), train_labels, head_features(head, test_features),
                        test_labels, num_classes, k, temperature, {**(protocol or {}), "features": EMBEDDING_FEATURES})


def evaluate_encoder(encoder, train_images, train_labels, test_images, test_labels, num_classes,
                     knn_k=200, knn_temperature=0.1, probe_epochs=100, seed=0, protocol=None,
                     embedding_head=None) -> dict:
    """kNN and linear probe of a frozen encoder; the metrics.json block of a run.

    With `embedding_head`, also kNN on the head's output (`knn_embedding`).
    """
    extract = feature_extractor(encoder)
    train_features, test_features = extract(train_images), extract(test_images)
    results = {"knn": knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                                   knn_k, knn_temperature, protocol)}
    if embedding_head is not None:
        results["knn_embedding"] = embedding_knn_accuracy(embedding_head, train_features, train_labels,
                                                          test_features, test_labels, num_classes, knn_k,
                                                          knn_temperature, protocol)
    if probe_epochs > 0:
        results["linear_probe"] = linear_probe(train_features, train_labels, test_features, test_labels,
                                               num_classes, epochs=probe_epochs, seed=seed, protocol=protocol)
    return results


class KnnMonitor(keras.callbacks.Callback):
    """Logs kNN accuracy on a held-out split every `every` epochs (`val_knn`; `val_knn_embedding`
    on the recipe's embedding when it has one)."""

    def __init__(self, train_images, train_labels, test_images, test_labels, num_classes,
                 every=1, k=200, temperature=0.1):
        super().__init__()
        self.data = (train_images, train_labels, test_images, test_labels)
        self.num_classes, self.every, self.k, self.temperature = num_classes, every, k, temperature
        self.extract = None

    def on_train_begin(self, logs=None):
        self.extract = feature_extractor(self.model.encoder)  # one trace for the whole run

    def on_epoch_end(self, epoch, logs=None):
        if self.every <= 0 or (epoch + 1) % self.every:
            return
        train_x, train_y, test_x, test_y = self.data
        train_features, test_features = self.extract(train_x), self.extract(test_x)
        accuracies = {"val_knn": knn_accuracy(train_features, train_y, test_features, test_y, self.num_classes,
                                              self.k, self.temperature)["accuracy"]}
        head = self.model.embedding_head()
        if head is not None:
            accuracies["val_knn_embedding"] = embedding_knn_accuracy(
                head, train_features, train_y, test_features, test_y, self.num_classes, self.k,
                self.temperature)["accuracy"]
        if logs is not None:
            logs.update(accuracies)
        embedding = (f", embedding = {accuracies['val_knn_embedding']:.4f}"
                     if "val_knn_embedding" in accuracies else "")
        print(f"\nepoch {epoch + 1}: kNN (k={self.k}, T={self.temperature}) on held-out = "
              f"{accuracies['val_knn']:.4f}{embedding}")
