"""Mixed-precision training: the network in 16-bit floats, the losses and state in float32.

Micikevicius et al. 2018 ("Mixed Precision Training", ICLR) run convolutions and matmuls
in half precision on float32 master weights, keep reductions and losses in float32, and
scale the float16 loss so that small gradients do not flush to zero. Keras's dtype
policies give the first part (`mixed_bfloat16`, `mixed_float16`: float32 variables,
16-bit compute); this module adds the rest for recipes:

* `computes_in_float32` casts a loss function's 16-bit tensor arguments to float32.
  Every loss in `recipes.losses` and `recipes.semi.losses` carries it: a softmax over
  cosine similarities divided by a temperature of 0.07 (bfloat16 keeps 8 bits of
  mantissa: a similarity is off by up to 0.004, a logit by 0.06), Sinkhorn-Knopp's
  exponentials and Barlow Twins' cross-correlation sums all need float32, and so do the
  queues, memory banks and centres that store their results.
* `optimizer_for`, called by `Recipe.compile`, wraps the optimizer in Keras's
  `LossScaleOptimizer` under `mixed_float16` (dynamic loss scaling); `Recipe.loss_and_gradients` scales the loss
  through `optimizer.scale_loss`, which is the identity for an unwrapped optimizer.
  bfloat16 has float32's exponent range and needs no scaling. When the scaler skips a
  step (its gradients overflowed), `Recipe.train_step` undoes the step's other updates
  too: BatchNorm statistics, EMA targets, queues, memory banks and centres
  (`Recipe.step_state`) keep nothing from a step that was not taken.

The published encoder is always float32 (`zoo.export.without_mixed_precision`): precision is a
training device, like augmentation.
"""

import contextlib
import functools

import tensorflow as tf

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
_HALF = (tf.bfloat16, tf.float16)


def _to_float32(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and tf.as_dtype(dtype) in _HALF:
        return tf.cast(x, tf.float32)
    return x


def computes_in_float32(function):
    """Decorator: bfloat16/float16 tensors among the arguments (also inside lists and
    tuples) are cast to float32 first; float32, float64 and integer arguments pass as they are."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        args, kwargs = tf.nest.map_structure(_to_float32, (args, kwargs))
        return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def global_policy(name: str):
    """Keras's global dtype policy set to `name` inside the block (models built there compute
    in it), and back to what it was after; `name` must be one of `POLICIES`."""
    from zoo.export import global_dtype_policy

    if name not in POLICIES:
        raise ValueError(f"Unknown precision {name!r}; choose one of {', '.join(POLICIES)}.")
    with global_dtype_policy(name):
        yield


def optimizer_for(optimizer, policy: str):
    """The optimizer, wrapped for dynamic loss scaling under mixed_float16 (once)."""
    import keras

    if policy == "mixed_float16" and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def inner_optimizer(optimizer):
    """The optimizer that holds the hyperparameters (weight decay, exclusions) under a loss-scale wrapper."""
    return getattr(optimizer, "inner_optimizer", optimizer)
