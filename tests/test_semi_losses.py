"""Semi-supervised losses and pseudo-label selection against hand-computed and numpy references."""

import numpy as np
import pytest
import tensorflow as tf

from recipes.semi.losses import (align_distribution, class_distribution, confidence_mask,
                                 fixmatch_unlabelled_loss, select_pseudo_labels, soft_cross_entropy)

# Six unlabelled examples, three classes; confidences 0.96, 0.50, 0.95, 0.60, 0.90, 0.40.
PROBS = np.array([
    [0.96, 0.02, 0.02],
    [0.50, 0.30, 0.20],
    [0.03, 0.95, 0.02],
    [0.60, 0.20, 0.20],
    [0.05, 0.05, 0.90],
    [0.30, 0.40, 0.30],
], np.float32)


def test_confidence_mask_by_hand():
    labels, mask = confidence_mask(PROBS, 0.95)
    np.testing.assert_array_equal(labels.numpy(), [0, 0, 1, 0, 2, 1])
    np.testing.assert_array_equal(mask.numpy(), [1, 0, 1, 0, 0, 0])  # 0.95 >= 0.95 is kept
    _, mask = confidence_mask(PROBS, 0.0)
    np.testing.assert_array_equal(mask.numpy(), np.ones(6))


def test_select_threshold_hard_and_soft():
    idx, targets = select_pseudo_labels(PROBS, threshold=0.6)
    np.testing.assert_array_equal(idx, [0, 2, 3, 4])
    np.testing.assert_array_equal(targets, [0, 1, 0, 2])
    idx, soft = select_pseudo_labels(PROBS, threshold=0.6, hard=False)
    np.testing.assert_array_equal(idx, [0, 2, 3, 4])
    np.testing.assert_allclose(soft, PROBS[[0, 2, 3, 4]])


def test_class_balanced_top_k_by_hand():
    # Predicted class 0: examples 0 (0.96), 1 (0.50), 3 (0.60); class 1: 2 (0.95), 5 (0.40); class 2: 4 (0.90).
    idx, targets = select_pseudo_labels(PROBS, threshold=0.0, per_class=2)
    np.testing.assert_array_equal(idx, [0, 3, 2, 5, 4])
    np.testing.assert_array_equal(targets, [0, 0, 1, 1, 2])
    # With filling, class 2 (one example) is repeated up to 2.
    idx, targets = select_pseudo_labels(PROBS, threshold=0.0, per_class=2, fill_classes=True)
    np.testing.assert_array_equal(idx, [0, 3, 2, 5, 4, 4])
    np.testing.assert_array_equal(targets, [0, 0, 1, 1, 2, 2])
    # Threshold first, then balance: class 1 keeps only example 2, class 0 only 0 and 3.
    idx, _ = select_pseudo_labels(PROBS, threshold=0.55, per_class=2, fill_classes=True)
    np.testing.assert_array_equal(idx, [0, 3, 2, 2, 4, 4])


def test_class_balance_ties_go_to_lower_index():
    probs = np.array([[0.7, 0.3], [0.7, 0.3], [0.8, 0.2], [0.7, 0.3]], np.float32)
    idx, _ = select_pseudo_labels(probs, per_class=2)
    np.testing.assert_array_equal(idx, [2, 0])


def test_select_rejects_bad_arguments():
    with pytest.raises(ValueError, match="per_class"):
        select_pseudo_labels(PROBS, per_class=0)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        select_pseudo_labels(PROBS[0])


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_soft_cross_entropy_matches_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(5, 4).astype(np.float32)
    targets = rng.dirichlet(np.ones(4), size=5).astype(np.float32)
    expected = -(targets * _log_softmax(logits.astype(np.float64))).sum(axis=1)
    np.testing.assert_allclose(soft_cross_entropy(targets, logits).numpy(), expected, rtol=1e-5)


def test_align_distribution_by_hand():
    # A model that predicts class 0 half the time and classes 1, 2 a quarter each:
    # toward uniform, class 0's probabilities are halved relative to the others.
    aligned = align_distribution([[0.5, 0.25, 0.25], [0.6, 0.3, 0.1]], [0.5, 0.25, 0.25]).numpy()
    np.testing.assert_allclose(aligned[0], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(aligned[1], np.array([0.6 / 2, 0.3, 0.1]) / 0.7, rtol=1e-6)
    # An explicit target: p(y) = (0.5, 0.25, 0.25) on a model predicting uniformly.
    aligned = align_distribution([[1 / 3, 1 / 3, 1 / 3]], [1 / 3, 1 / 3, 1 / 3], target=[0.5, 0.25, 0.25])
    np.testing.assert_allclose(aligned.numpy()[0], [0.5, 0.25, 0.25], rtol=1e-6)
    # A class never predicted (its softmax underflowed to 0) stays at 0 instead of turning rows into NaN.
    aligned = align_distribution([[0.0, 0.5, 0.5]], [0.0, 0.5, 0.5]).numpy()
    np.testing.assert_allclose(aligned[0], [0.0, 0.5, 0.5], rtol=1e-6)


def test_fixmatch_unlabelled_loss_with_alignment_matches_numpy():
    rng = np.random.RandomState(2)
    weak = (rng.randn(8, 4) * 3).astype(np.float32)
    strong = rng.randn(8, 4).astype(np.float32)
    prediction_mean = np.array([0.55, 0.05, 0.2, 0.2])
    tau = 0.7

    q = np.exp(_log_softmax(weak.astype(np.float64))) * (0.25 / prediction_mean)
    q /= q.sum(axis=1, keepdims=True)
    mask = (q.max(axis=1) >= tau).astype(np.float64)
    pseudo = q.argmax(axis=1)
    expected = -_log_softmax(strong.astype(np.float64))[np.arange(8), pseudo] * mask
    unaligned_pseudo = weak.argmax(axis=1)
    assert (pseudo != unaligned_pseudo).any(), "the example should move some pseudo-labels"
    assert 0 < mask.sum() < 8

    losses, mask_t, pseudo_t = fixmatch_unlabelled_loss(tf.constant(weak), tf.constant(strong), tau,
                                                        tf.constant(prediction_mean, tf.float32))
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask_t.numpy(), mask)
    np.testing.assert_array_equal(pseudo_t.numpy(), pseudo)


def test_fixmatch_unlabelled_loss_aligns_to_the_labelled_distribution():
    rng = np.random.RandomState(3)
    weak = (rng.randn(16, 4) * 3).astype(np.float32)
    strong = rng.randn(16, 4).astype(np.float32)
    prediction_mean = np.array([0.25, 0.25, 0.25, 0.25])
    target = np.array([0.7, 0.1, 0.1, 0.1])  # an imbalanced labelled set: class 0 is most of it
    tau = 0.8

    q = np.exp(_log_softmax(weak.astype(np.float64))) * (target / prediction_mean)
    q /= q.sum(axis=1, keepdims=True)
    mask = (q.max(axis=1) >= tau).astype(np.float64)
    pseudo = q.argmax(axis=1)
    expected = -_log_softmax(strong.astype(np.float64))[np.arange(16), pseudo] * mask
    assert (pseudo != weak.argmax(axis=1)).any() and 0 < mask.sum() < 16

    losses, mask_t, pseudo_t = fixmatch_unlabelled_loss(tf.constant(weak), tf.constant(strong), tau,
                                                        tf.constant(prediction_mean, tf.float32), target=target)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask_t.numpy(), mask)
    np.testing.assert_array_equal(pseudo_t.numpy(), pseudo)


def test_class_distribution_normalizes_counts_and_refuses_non_distributions():
    assert class_distribution([30, 10, 0, 60], 4) == [0.3, 0.1, 0.0, 0.6]
    for bad in ([1, 2, 3], [1, -1, 1, 1], [0, 0, 0, 0], [1, np.nan, 1, 1]):
        with pytest.raises(ValueError, match="4 non-negative weights"):
            class_distribution(bad, 4)


def test_fixmatch_unlabelled_loss_matches_numpy_and_stops_gradient():
    rng = np.random.RandomState(1)
    weak = (rng.randn(8, 5) * 4).astype(np.float32)
    strong = rng.randn(8, 5).astype(np.float32)
    tau = 0.9

    # Independent numpy reference of eq. 4 (before the 1/(mu B) reduction).
    q = np.exp(_log_softmax(weak.astype(np.float64)))
    mask = (q.max(axis=1) >= tau).astype(np.float64)
    pseudo = q.argmax(axis=1)
    expected = -_log_softmax(strong.astype(np.float64))[np.arange(8), pseudo] * mask
    assert 0 < mask.sum() < 8, "the example should exercise both kept and masked rows"

    weak_t, strong_t = tf.constant(weak), tf.constant(strong)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([weak_t, strong_t])
        losses, mask_t, pseudo_t = fixmatch_unlabelled_loss(weak_t, strong_t, tau)
        total = tf.reduce_sum(losses)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask_t.numpy(), mask)
    np.testing.assert_array_equal(pseudo_t.numpy(), pseudo)
    assert tape.gradient(total, weak_t) is None  # pseudo-labels are targets, not a path for gradients
    grad_strong = tape.gradient(total, strong_t).numpy()
    # d/dz H(y, softmax(z)) = softmax(z) - onehot(y), on kept rows only.
    p_strong = np.exp(_log_softmax(strong.astype(np.float64)))
    expected_grad = (p_strong - np.eye(5)[pseudo]) * mask[:, None]
    np.testing.assert_allclose(grad_strong, expected_grad, rtol=1e-5, atol=1e-6)
