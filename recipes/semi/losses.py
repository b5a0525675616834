"""Losses and pseudo-label selection of the semi-supervised recipes, as pure functions.

Kept apart from `recipes/losses.py` (the self-supervised losses) because these all
take class logits and labels rather than embeddings. Every loss returns per-example
values so the recipe chooses the reduction: under tf.distribute it sums them and
divides by the *global* batch, which makes replica gradients add up to the
single-device gradient.

Two selection rules live here:

* `confidence_mask` (tensors, inside a train step): FixMatch's (Sohn et al. 2020,
  eq. 4) rule, keep an unlabelled example when its highest class probability is at
  least the threshold tau.
* `select_pseudo_labels` (numpy, between self-training rounds): the same threshold,
  optionally followed by class balancing: Noisy Student (Xie et al. 2020, sec. 2)
  keeps at most K most confident images per class and duplicates images of classes
  that have fewer than K, so the student does not inherit the teacher's class
  imbalance.

And one correction of the pseudo-label distribution, `align_distribution`
(distribution alignment, Berthelot et al. 2020, ReMixMatch sec. 3.2), FixMatch's
optional remedy for a model that under-predicts some classes and keeps doing so
through its own confident labels.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from recipes.precision import computes_in_float32


@computes_in_float32
def soft_cross_entropy(targets, logits):
    """-sum_k t_k log softmax(z)_k per example; t is a distribution (one-hot for hard labels).

    Args:
      targets: [B, K] probabilities.
      logits: [B, K] unnormalized class scores.

    Returns:
      [B] per-example cross-entropies.
    """
    return -tf.reduce_sum(tf.cast(targets, logits.dtype) * tf.nn.log_softmax(logits, axis=-1), axis=-1)


@computes_in_float32
def sparse_cross_entropy(labels, logits):
    """Cross-entropy with integer labels, per example: [B]."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)


@computes_in_float32
def confidence_mask(probabilities, threshold):
    """FixMatch's confidence rule: (hard pseudo-labels [B] int32, mask [B] float32).

    mask_b = 1 if max_k p_bk >= threshold else 0; the pseudo-label is argmax_k p_bk.
    `>=` as in the paper's 1(max(q_b) >= tau), so threshold=1.0 keeps only certain
    predictions and threshold=0.0 keeps everything.
    """
    probabilities = tf.convert_to_tensor(probabilities)
    pseudo_labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    mask = tf.cast(tf.reduce_max(probabilities, axis=-1) >= threshold, tf.float32)
    return pseudo_labels, mask


@computes_in_float32
def align_distribution(probabilities, prediction_mean, target=None):
    """Distribution alignment: q~ = normalize(q * p(y) / p~(y)), row by row.

    p~(y) is the model's mean prediction on unlabelled data (ReMixMatch: over the
    last 128 batches) and p(y) the labelled data's class distribution (`target`;
    None = uniform, as for class-balanced labels). Classes the model predicts less
    often than p(y) says get their probabilities scaled up before the argmax and
    the threshold, and over-predicted classes scaled down.

    Args:
      probabilities: [B, K] class probabilities.
      prediction_mean: [K] running mean of the model's unlabelled predictions.
      target: [K] class distribution to align to, or None for uniform.

    Returns:
      [B, K] aligned probabilities (rows sum to 1).
    """
    probabilities = tf.convert_to_tensor(probabilities)
    # Floored: a class whose softmax underflowed to 0 in every recent batch would make 0 * inf = NaN.
    prediction_mean = tf.maximum(tf.cast(prediction_mean, probabilities.dtype), 1e-12)
    ratio = (1.0 if target is None else tf.cast(target, probabilities.dtype)) / prediction_mean
    aligned = probabilities * ratio
    return aligned / tf.reduce_sum(aligned, axis=-1, keepdims=True)


def class_distribution(weights, num_classes) -> list:
    """`weights` (e.g. labelled images per class) normalized to sum to 1: the p(y) that
    `align_distribution` aligns to. Refuses what is not a distribution over the classes."""
    weights = np.asarray(weights, np.float64)
    if weights.shape != (num_classes,) or not np.isfinite(weights).all() or (weights < 0).any() \
            or weights.sum() <= 0:
        raise ValueError(f"A class distribution needs {num_classes} non-negative weights with a positive sum, "
                         f"got {np.asarray(weights).tolist()}.")
    return (weights / weights.sum()).tolist()


@computes_in_float32
def fixmatch_unlabelled_loss(weak_logits, strong_logits, threshold, prediction_mean=None, target=None):
    """FixMatch's unsupervised term per example (Sohn et al. 2020, eq. 4), before 1/(mu B).

        l_b = 1(max q_b >= tau) * H(argmax q_b, softmax(strong_logits_b)),
        q_b = softmax(weak_logits_b), with no gradient through q_b.

    With `prediction_mean` (the model's running mean prediction on unlabelled
    images), q_b is first aligned to `target`, the labelled class distribution
    (None: uniform; `align_distribution`).

    Returns:
      (per-example losses [U], mask [U], pseudo-labels [U]).
    """
    weak_probabilities = tf.nn.softmax(tf.stop_gradient(weak_logits), axis=-1)
    if prediction_mean is not None:
        weak_probabilities = align_distribution(weak_probabilities, tf.stop_gradient(prediction_mean), target)
    pseudo_labels, mask = confidence_mask(weak_probabilities, threshold)
    losses = sparse_cross_entropy(pseudo_labels, strong_logits) * tf.cast(mask, strong_logits.dtype)
    return losses, mask, pseudo_labels


def select_pseudo_labels(probabilities, threshold=0.0, per_class=None, fill_classes=False, hard=True):
    """Which unlabelled examples become training data, and with what targets.

    1. Keep example i when max_k p_ik >= threshold (Lee 2013 keeps all, i.e. 0;
       Noisy Student 0.3; FixMatch-style self-training 0.95).
    2. With `per_class=K`: among the kept examples predicted as class c, keep the K
       most confident (ties broken by lower index). With `fill_classes` too, a class
       with fewer than K kept examples has them repeated, cycling from the most
       confident, up to K (Noisy Student duplicates at random; cycling keeps every
       example's count within one of every other's, which random duplication only
       does on average).

    Args:
      probabilities: [N, K] teacher class probabilities on the unlabelled images.
      threshold: confidence threshold.
      per_class: K of class balancing, or None for no balancing.
      fill_classes: repeat examples of under-filled classes up to `per_class`.
      hard: return integer labels (argmax); otherwise the probability rows.

    Returns:
      (indices [M] int64 into the unlabelled set, possibly repeated, grouped by class,
       targets [M] int64 if hard else [M, K] float32).
    """
    probabilities = np.asarray(probabilities, np.float32)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be [N, K], got shape {probabilities.shape}.")
    if per_class is not None and int(per_class) < 1:
        raise ValueError(f"per_class must be a positive int or None, got {per_class!r}.")
    confidence = probabilities.max(axis=1)
    predicted = probabilities.argmax(axis=1)
    kept = np.flatnonzero(confidence >= threshold)
    if per_class is not None:
        chosen = []
        for c in range(probabilities.shape[1]):
            members = kept[predicted[kept] == c]
            # Stable sort on -confidence: most confident first, lower index wins ties.
            members = members[np.argsort(-confidence[members], kind="stable")][: int(per_class)]
            if fill_classes and 0 < len(members) < int(per_class):
                members = np.resize(members, int(per_class))
            chosen.append(members)
        kept = np.concatenate(chosen) if chosen else kept[:0]
    kept = kept.astype(np.int64)
    targets = predicted[kept].astype(np.int64) if hard else probabilities[kept]
    return kept, targets
