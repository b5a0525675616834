"""Clustering recipes (SwAV): distributed equality with the queue, prototype mechanics, learning."""

import numpy as np

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
