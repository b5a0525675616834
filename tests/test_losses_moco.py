"""InfoNCE (MoCo) against an independent numpy reference."""

import numpy as np

from recipes import losses


def _reference_info_nce(q, k, queue, temperature):
    out = []
    for i in range(len(q)):
        logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / temperature
        out.append(-logits[0] + np.log(np.sum(np.exp(logits))))
    return np.array(out)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_info_nce_matches_numpy():
    rng = np.random.RandomState(0)
    q, k, queue = _unit(rng.randn(6, 5)), _unit(rng.randn(6, 5)), _unit(rng.randn(11, 5))
    for temperature in (0.07, 0.2, 1.0):
        got = losses.info_nce(q.astype(np.float32), k.astype(np.float32), queue.astype(np.float32), temperature)
        np.testing.assert_allclose(got.numpy(), _reference_info_nce(q, k, queue, temperature), rtol=1e-5)


def test_info_nce_is_low_when_positive_dominates():
    rng = np.random.RandomState(1)
    q = _unit(rng.randn(4, 8)).astype(np.float32)
    queue = _unit(rng.randn(16, 8)).astype(np.float32)
    aligned = losses.info_nce(q, q, queue, 0.2).numpy()
    shuffled = losses.info_nce(q, q[::-1].copy(), queue, 0.2).numpy()
    assert aligned.mean() < shuffled.mean()
