"""Losses of issue 5 against independent numpy references (loops over the definitions)."""

import numpy as np
import tensorflow as tf

from recipes import losses


def _rng(seed=0):
    return np.random.RandomState(seed)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax_at(logits, index):
    m = logits.max()
    return logits[index] - (m + np.log(np.exp(logits - m).sum()))


def test_nt_xent_matches_loop_over_anchors():
    z_1, z_2 = _rng(0).randn(5, 4).astype("float32"), _rng(1).randn(5, 4).astype("float32")
    t = 0.5
    views = _unit(np.concatenate([z_1, z_2]))  # 2N views, view k's partner is (k + N) mod 2N
    n = len(z_1)
    expected = []
    for k in range(2 * n):
        positive = (k + n) % (2 * n)
        sims = {j: views[k] @ views[j] / t for j in range(2 * n) if j != k}
        denominator = sum(np.exp(s) for s in sims.values())
        expected.append(-np.log(np.exp(sims[positive]) / denominator))
    got = losses.nt_xent(tf.constant(z_1), tf.constant(z_2), t).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_nt_xent_local_anchors_against_global_batch_equal_slices_of_the_full_loss():
    z_1, z_2 = _rng(2).randn(6, 3).astype("float32"), _rng(3).randn(6, 3).astype("float32")
    full = losses.nt_xent(z_1, z_2, 0.2).numpy()
    part = losses.nt_xent(z_1[2:4], z_2[2:4], 0.2, all_z_1=z_1, all_z_2=z_2, offset=2).numpy()
    np.testing.assert_allclose(part, np.concatenate([full[2:4], full[8:10]]), rtol=1e-5, atol=1e-6)


def test_instance_softmax_matches_definition():
    features = _unit(_rng(4).randn(3, 5)).astype("float32")
    memory = _unit(_rng(5).randn(7, 5)).astype("float32")
    index = np.array([0, 4, 6])
    expected = []
    for f, i in zip(features, index):
        scores = np.array([np.exp(memory[j] @ f / 0.07) for j in range(7)])
        expected.append(-np.log(scores[i] / scores.sum()))
    got = losses.instance_softmax(features, memory, index, 0.07).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_instance_nce_matches_paper_equations():
    positive = _rng(6).uniform(-1, 1, 4).astype("float32")
    noise = _rng(7).uniform(-1, 1, (4, 3)).astype("float32")
    t, n, z = 0.1, 50, 123.0
    m = noise.shape[1]
    expected = []
    for b in range(4):
        p = np.exp(positive[b] / t) / z
        h_pos = p / (p + m / n)
        value = -np.log(h_pos)
        for j in range(m):
            p = np.exp(noise[b, j] / t) / z
            value -= np.log(1 - p / (p + m / n))
        expected.append(value)
    got = losses.instance_nce(positive, noise, t, np.log(z), n).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_cpc_info_nce_is_cross_entropy_of_bilinear_scores():
    predictions, candidates = _rng(8).randn(4, 3), _rng(9).randn(6, 3)
    target = np.array([5, 0, 2, 2])
    expected = [-_log_softmax_at(candidates @ p, i) for p, i in zip(predictions, target)]
    got = losses.cpc_info_nce(predictions.astype("float32"), candidates.astype("float32"), target).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_byol_loss_is_squared_distance_of_unit_vectors():
    p, z = _rng(10).randn(4, 6), _rng(11).randn(4, 6)
    expected = ((_unit(p) - _unit(z)) ** 2).sum(axis=1)
    got = losses.byol_loss(p.astype("float32"), z.astype("float32")).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_barlow_twins_loss_matches_cross_correlation_definition():
    z_1, z_2 = _rng(12).randn(8, 4), _rng(13).randn(8, 4) + 0.5 * _rng(12).randn(8, 4)
    lam = 0.3
    n, d = z_1.shape
    a = (z_1 - z_1.mean(0)) / np.sqrt(z_1.var(0) + 1e-5)
    b = (z_2 - z_2.mean(0)) / np.sqrt(z_2.var(0) + 1e-5)
    expected = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            expected += (1 - c) ** 2 if i == j else lam * c**2
    got = float(losses.barlow_twins_loss(z_1.astype("float32"), z_2.astype("float32"), lam))
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_dino_loss_averages_cross_entropies_over_pairs_of_different_views():
    rng = _rng(14)
    student = [rng.randn(3, 5) for _ in range(4)]  # 2 global + 2 local
    teacher = [rng.randn(3, 5) for _ in range(2)]
    center, ts, tt = rng.randn(5) * 0.1, 0.1, 0.04

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected, pairs = np.zeros(3), 0
    for t in range(2):
        p_t = softmax((teacher[t] - center) / tt)
        for s in range(4):
            if s != t:
                expected += -(p_t * np.log(softmax(student[s] / ts))).sum(-1)
                pairs += 1
    expected /= pairs
    got = losses.dino_loss([tf.constant(s, tf.float32) for s in student], [tf.constant(t, tf.float32) for t in teacher],
                           tf.constant(center, tf.float32), ts, tt).numpy()
    assert pairs == 6
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_pretext_cross_entropy_is_minus_log_softmax_of_the_true_class():
    rng = _rng(7)
    logits, labels = rng.randn(8, 4) * 3, rng.randint(0, 4, 8)
    expected = [-_log_softmax_at(logits[i], labels[i]) for i in range(8)]
    got = losses.pretext_cross_entropy(tf.constant(logits, tf.float32), tf.constant(labels)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def _sinkhorn_reference(scores, epsilon, iterations):
    """The paper's Algorithm 1 as written, prototypes x samples, one device."""
    q = np.exp(scores / epsilon).T  # K x N
    q /= q.sum()
    k, n = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


def test_sinkhorn_knopp_matches_the_papers_algorithm_and_shares_prototypes_out():
    rng = _rng(8)
    scores = np.tanh(rng.randn(12, 5))  # cosines
    got = losses.sinkhorn_knopp(tf.constant(scores), epsilon=0.05, iterations=3).numpy()
    np.testing.assert_allclose(got, _sinkhorn_reference(scores, 0.05, 3), rtol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    # converged, every prototype takes 1/K of the batch (the equipartition that prevents collapse)
    converged = losses.sinkhorn_knopp(tf.constant(scores), epsilon=0.05, iterations=200).numpy()
    np.testing.assert_allclose(converged.sum(axis=0), 12 / 5, rtol=1e-4)
    # shared rows (a queue) are samples too, whose codes are not returned
    queue = np.tanh(rng.randn(8, 5))
    with_queue = losses.sinkhorn_knopp(tf.constant(scores), 0.05, 3, shared_scores=tf.constant(queue)).numpy()
    np.testing.assert_allclose(with_queue, _sinkhorn_reference(np.concatenate([queue, scores]), 0.05, 3)[8:],
                               rtol=1e-6)


def test_swav_loss_predicts_each_global_views_code_from_every_other_view():
    rng = _rng(9)
    scores = [np.tanh(rng.randn(4, 6)) for _ in range(4)]  # 2 global + 2 local views
    codes = [rng.dirichlet(np.ones(6), 4) for _ in range(2)]
    expected = np.zeros(4)
    for i in range(2):
        for b in range(4):
            expected[b] += np.mean([-sum(codes[i][b, k] * _log_softmax_at(scores[v][b] / 0.1, k) for k in range(6))
                                    for v in range(4) if v != i]) / 2
    got = losses.swav_loss([tf.constant(s) for s in scores], [tf.constant(c) for c in codes], 0.1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_masked_patch_mse_counts_hidden_patches_against_normalized_pixels():
    rng = _rng(10)
    predictions, targets = rng.randn(2, 5, 6), rng.rand(2, 5, 6) * 255
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], float)
    expected = np.zeros(2)
    for b in range(2):
        errors = []
        for n in range(5):
            if mask[b, n]:
                t = targets[b, n]
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)  # unbiased, as torch's .var()
                errors.append(np.mean((predictions[b, n] - t) ** 2))
        expected[b] = np.mean(errors)
    got = losses.masked_patch_mse(tf.constant(predictions), tf.constant(targets), tf.constant(mask)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    raw = losses.masked_patch_mse(tf.constant(predictions), tf.constant(targets), tf.constant(mask),
                                  normalize_targets=False).numpy()
    np.testing.assert_allclose(raw[1], np.mean((predictions[1, 3:] - targets[1, 3:]) ** 2), rtol=1e-6)


def test_counting_loss_matches_tiles_and_pushes_other_images_past_the_margin():
    rng = _rng(11)
    whole, tiles_sum, other = (np.abs(rng.randn(5, 7)) for _ in range(3))
    expected = [np.sum((whole[b] - tiles_sum[b]) ** 2) + max(0.0, 10.0 - np.sum((other[b] - tiles_sum[b]) ** 2))
                for b in range(5)]
    got = losses.counting_loss(tf.constant(whole), tf.constant(tiles_sum), tf.constant(other), 10.0).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
