"""Batched views: the same image gets the same view, bit for bit, on 1 or N replicas."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from recipes.augment import ViewPolicy, random_view
from tests.distributed_utils import two_replica_strategy


def test_views_are_bitwise_equal_on_one_and_two_replicas():
    # 32 px, blur asked for (by default CIFAR-size images are not blurred); 6 rows per replica against 12 on one device: crop boxes
    # (exp, sqrt) or blur kernels (exp) computed per replica round differently in the
    # last bit, so both are computed for the global batch and sliced. (Fails if either is not.)
    images = np.random.RandomState(0).randint(0, 256, (12, 32, 32, 3)).astype("uint8")
    seed = tf.constant([3, 4])
    policy = ViewPolicy(jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_min_size=32)  # crop, flip, blur all
    assert ViewPolicy().blur_min_size > 32
    view = tf.function(lambda x: random_view(x, seed, policy, 12))  # graph mode on both sides
    whole = view(tf.constant(images)).numpy()
    strategy = two_replica_strategy()
    halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(images[6 * ctx.replica_id_in_sync_group:6 * (ctx.replica_id_in_sync_group + 1)]))
    per_replica = strategy.run(view, args=(halves,))
    np.testing.assert_array_equal(np.concatenate([v.numpy() for v in strategy.experimental_local_results(per_replica)]),
                                  whole)


def test_policy_overrides_change_named_fields_and_keep_the_rest():
    from recipes.augment import BYOL_VIEW_1, BYOL_VIEW_2, updated_policies

    changed = BYOL_VIEW_1.updated({"crop_scale": [0.5, 1.0]})
    assert changed.crop_scale == (0.5, 1.0) and changed.blur_p == BYOL_VIEW_1.blur_p == 1.0
    assert ViewPolicy.from_config(changed.to_config()) == changed  # a saved config reloads as is
    pair = updated_policies([BYOL_VIEW_1, BYOL_VIEW_2], [{}, {"solarize_p": 0.0}])
    assert pair == [BYOL_VIEW_1, dataclasses.replace(BYOL_VIEW_2, solarize_p=0.0)]
    with pytest.raises(ValueError, match=r"Unknown view policy field\(s\) \['crop'\]. Known: crop_scale"):
        BYOL_VIEW_1.updated({"crop": [0.5, 1.0]})
    with pytest.raises(ValueError, match="needs 2 dicts"):
        updated_policies([BYOL_VIEW_1, BYOL_VIEW_2], [{}])
