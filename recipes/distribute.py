"""tf.distribute plumbing shared by all recipes.

Recipes run their train step in *replica context*. Three things must be right there
for a 2-replica run to equal a 1-replica run on the same global batch:
  * the loss is scaled by the global batch (the optimizer SUMs replica gradients);
  * tensors gathered across replicas (negatives, keys) keep a correct gradient:
    `all_gather` sends each replica back the SUM over replicas of the gradient
    of its own slice;
  * state that every replica computes identically (queues, EMA weights) is written
    once per device through `assign_synced`.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def make_strategy(name: str = "default", devices=None) -> tf.distribute.Strategy:
    """Returns the strategy named by the --strategy flag.

    default: one device. mirrored: all local devices (GPUs, else the CPU devices
    given). multi_worker: MultiWorkerMirroredStrategy from the TF_CONFIG env var.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy=multi_worker needs the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}).'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(STRATEGIES)}.")


def is_chief() -> bool:
    """True on the worker that owns the outputs (always true outside multi-worker)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task")
    if not task:
        return True
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and task.get("index", 0) == 0


def task_index() -> int:
    """This worker's index in TF_CONFIG (0 outside multi-worker)."""
    return int(json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {}).get("index", 0))


def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
    """This replica's index (a tensor under MirroredStrategy, 0 otherwise)."""
    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group


def all_gather(x):
    """Concatenates `x` from all replicas along axis 0, in replica order, with gradient.

    d(loss)/d(x_r) is the sum over replicas of the gradient each replica's loss
    sends to slice r of the gathered tensor, hence the all-reduce in the backward
    pass. All replicas must hold the same number of rows.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x

    @tf.custom_gradient
    def gather(local):
        gathered = context.all_gather(local, axis=0)
        if local.shape[0] is not None:  # keep the static batch size recipes rely on
            gathered = tf.ensure_shape(gathered, [local.shape[0] * context.num_replicas_in_sync, *local.shape[1:]])

        def grad(upstream):
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, upstream)
            rows = tf.shape(local)[0]
            start = tf.cast(context.replica_id_in_sync_group, tf.int32) * rows
            return total[start : start + rows]

        return gathered, grad

    return gather(x)


def all_reduce_sum(x):
    """`x` summed over replicas, without gradient (for statistics such as Sinkhorn's marginals)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(x))


def replica_slice(global_tensor, local_rows):
    """Rows of a globally computed tensor that belong to this replica."""
    start = tf.cast(replica_id(), tf.int32) * local_rows
    return global_tensor[start : start + local_rows]


def _variable(v):
    return v.value if hasattr(v, "value") and isinstance(v.value, tf.Variable) else v


def assign_synced(variables, values):
    """Assigns values that are identical on every replica to mirrored variables.

    Keras creates most variables with aggregation NONE, which cannot be assigned
    in replica context; a merge_call writes each device's copy from its replica.
    """
    variables = [_variable(v) for v in variables]
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        for variable, value in zip(variables, values):
            variable.assign(value)
        return

    def merge_fn(strategy, values):
        for variable, value in zip(variables, values):
            strategy.extended.update(variable, lambda var, v: var.assign(v), args=(value,), group=False)

    context.merge_call(merge_fn, args=(list(values),))
