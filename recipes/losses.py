"""Self-supervised losses as pure functions of tensors.

Each returns per-example losses (shape [batch]) so that the caller decides the
reduction; under tf.distribute a recipe sums them and divides by the *global* batch
size, which makes the summed gradient across replicas equal the single-device one.
Every function here is checked against an independent numpy reference in
tests/test_losses.py.
"""

import tensorflow as tf


def l2_normalize(x, axis=-1):
    """Unit-length rows; the embedding space every contrastive loss lives in."""
    return tf.math.l2_normalize(x, axis=axis, epsilon=1e-12)


def info_nce(queries, positive_keys, negative_keys, temperature):
    """InfoNCE of MoCo (He et al. 2020, eq. 1; van den Oord et al. 2018).

    For each query q with positive key k+ and shared negatives {k-}:
        loss = -log( exp(q.k+/T) / (exp(q.k+/T) + sum_k- exp(q.k-/T)) )
    The inputs are expected L2-normalized (dot product = cosine similarity).

    Args:
      queries: [B, D] query embeddings.
      positive_keys: [B, D] the key of the same image under another view.
      negative_keys: [K, D] keys of other images (MoCo's queue).
      temperature: softmax temperature T (0.2 in MoCo v2).

    Returns:
      [B] per-example losses.
    """
    positive_logits = tf.reduce_sum(queries * positive_keys, axis=-1, keepdims=True)
    negative_logits = tf.matmul(queries, negative_keys, transpose_b=True)
    logits = tf.concat([positive_logits, negative_logits], axis=1) / temperature
    # The positive sits at index 0 of every row.
    return tf.reduce_logsumexp(logits, axis=1) - logits[:, 0]


def contrastive_accuracy(queries, positive_keys, negative_keys):
    """Fraction of queries whose positive key beats every negative: a health signal."""
    positive_logits = tf.reduce_sum(queries * positive_keys, axis=-1)
    best_negative = tf.reduce_max(tf.matmul(queries, negative_keys, transpose_b=True), axis=1)
    return tf.reduce_mean(tf.cast(positive_logits > best_negative, tf.float32))
