"""SGD with the papers' weight decay: an L2 term in the gradient, accumulated by momentum.

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
