"""Optimizers the papers use and Keras lacks: SGD with coupled weight decay, and LARS.

Keras's `weight_decay` is decoupled (Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization"): every step multiplies each weight by (1 - lr * wd), outside the momentum
buffer. The papers whose SGD settings the recipes copy (MoCo, NPID and SimCLR's CIFAR runs in
PyTorch's `torch.optim.SGD`; FixMatch's TensorFlow code, which adds wd * sum(w^2) / 2 to the
loss) instead add wd * w to the gradient, and momentum m accumulates it: in steady state the
pull towards zero is 1 / (1 - m) times stronger, 10x at m = 0.9. So Keras's
`SGD(weight_decay=5e-4)` regularizes about as much as the papers' wd = 5e-5, not 5e-4.
`SGDL2(l2=wd)` is the papers' optimizer.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ssl_recipes")
class SGDL2(keras.optimizers.SGD):
    """SGD (optionally Nesterov) whose weight decay `l2` is added to the gradient.

    Args:
      learning_rate, momentum, nesterov: as `keras.optimizers.SGD`.
      l2: coefficient of the L2 penalty l2/2 * |w|^2, i.e. gradient += l2 * w.
      l2_kernels_only: decay only variables named "kernel" (Dense and convolution
        weights), not biases or BatchNorm scales and offsets, as FixMatch's code does.
        `exclude_from_weight_decay(...)` narrows the set further, as for any Keras
        optimizer.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, l2=0.0, l2_kernels_only=False,
                 **kwargs):
        if kwargs.get("weight_decay") is not None:
            raise ValueError("SGDL2 takes its weight decay as `l2` (coupled); `weight_decay` would add "
                             "Keras's decoupled decay on top of it.")
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate, momentum=momentum, nesterov=nesterov, **kwargs)
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}.")
        self.l2 = float(l2)
        self.l2_kernels_only = bool(l2_kernels_only)

    def build(self, variables):
        super().build(variables)
        # Chosen here, on the Keras variables: update_step may get a replica's copy of one
        # ("dense/kernel/replica_1:0" under MirroredStrategy), found again by its key.
        self._l2_keys = {self._var_key(v) for v in variables if self.decays(v)}

    def decays(self, variable) -> bool:
        """Whether the Keras variable `variable` gets the L2 term."""
        if self.l2_kernels_only and variable.name != "kernel":
            return False
        return self._use_weight_decay(variable)

    def update_step(self, gradient, variable, learning_rate):
        if self.l2 and self._var_key(variable) in self._l2_keys:
            gradient = ops.add(gradient, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2, "l2_kernels_only": self.l2_kernels_only}


@keras.saving.register_keras_serializable(package="ssl_recipes")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling: SGD whose step for each weight matrix is scaled to its norm.

    You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"; the optimizer of
    SimCLR, BYOL and Barlow Twins. Per weight w with gradient g (the Barlow Twins code's form):
        g <- g + l2 * w;   g <- g * eta * |w| / |g|   (1 where either norm is 0)
        buf <- momentum * buf + g;   w <- w - lr * buf
    so a step moves each layer by about lr * eta of its own norm, whatever the scale of the loss.
    That matters for losses that are sums over thousands of terms (Barlow Twins' D x D
    correlation): plain SGD's step grows with the loss's scale, LARS's does not.

    Vectors (biases, BatchNorm scales and offsets) get neither the L2 term nor the scaling, as in
    all three papers; Barlow Twins also gives them a smaller rate (0.0048 against 0.2 for the
    weights): `vector_lr_scale`.

    `clip=True` is LARC's clip mode (NVIDIA apex; solo-learn's `clip_lr`, with which its CIFAR
    BYOL and DINO runs use lr 1.0 / 0.3 at eta 0.02): a layer's rate is min(eta |w| / |g|, lr),
    the trust ratio itself, capped at the global rate. Without it (scale mode) the rate is
    lr * eta |w| / |g|, unbounded: a layer whose gradient is tiny next to its weights still
    moves lr * eta of its norm each step, noise included.

    Args:
      learning_rate: rate or schedule (the papers: 0.2-0.3 x batch / 256).
      momentum: 0.9.
      l2: coupled weight decay (added to the gradient before the scaling), as in the papers.
      eta: trust coefficient (1e-3 in the papers' ImageNet runs).
      vector_lr_scale: multiplies the rate of vectors (1.0; Barlow Twins: 0.0048 / 0.2 = 0.024).
      clip: LARC's clip mode, each layer's rate min(trust ratio, lr) (False: the papers' form).
    """

    def __init__(self, learning_rate=0.2, momentum=0.9, l2=0.0, eta=1e-3, vector_lr_scale=1.0, clip=False,
                 name="lars", **kwargs):
        if kwargs.get("weight_decay") is not None:
            raise ValueError("LARS takes its weight decay as `l2` (added to the gradient before the trust ratio).")
        kwargs.pop("weight_decay", None)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        for field, value in (("momentum", momentum), ("l2", l2), ("eta", eta), ("vector_lr_scale", vector_lr_scale)):
            if value < 0:
                raise ValueError(f"LARS {field} must be >= 0, got {value}.")
        self.momentum, self.l2, self.eta = float(momentum), float(l2), float(eta)
        self.vector_lr_scale = float(vector_lr_scale)
        self.clip = bool(clip)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        learning_rate = ops.cast(learning_rate, dtype)
        if len(variable.shape) > 1:  # a weight matrix or kernel; decided by shape, so replica copies agree
            gradient = ops.add(gradient, ops.multiply(ops.cast(self.l2, dtype), variable))
            weight_norm, gradient_norm = ops.norm(ops.reshape(variable, [-1])), ops.norm(ops.reshape(gradient, [-1]))
            usable = ops.logical_and(ops.greater(weight_norm, 0.0), ops.greater(gradient_norm, 0.0))
            trust = ops.where(usable, ops.cast(self.eta, dtype) * weight_norm / ops.maximum(gradient_norm, 1e-30),
                              ops.ones_like(weight_norm))
            if self.clip:  # min(trust, lr) / lr; at lr 0 the step is 0 whatever the factor
                trust = ops.where(ops.greater(learning_rate, 0.0),
                                  ops.minimum(trust, learning_rate) / ops.maximum(learning_rate, 1e-30), 1.0)
            gradient = ops.multiply(gradient, trust)
        else:
            learning_rate = ops.multiply(learning_rate, ops.cast(self.vector_lr_scale, dtype))
        buffer = self.momentums[self._get_variable_index(variable)]
        self.assign(buffer, ops.add(ops.multiply(buffer, ops.cast(self.momentum, dtype)), gradient))
        self.assign_sub(variable, ops.multiply(buffer, learning_rate))

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "l2": self.l2, "eta": self.eta,
                "vector_lr_scale": self.vector_lr_scale, "clip": self.clip}
