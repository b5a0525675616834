"""Projection and prediction heads: small MLPs that sit on the encoder during training.

They are thrown away after pretraining (the zoo publishes the encoder only), but the
loss is computed on their output: Chen et al. 2020 (SimCLR) showed a nonlinear
projection makes the encoder's own features better, and MoCo v2 adopted it.
"""

import keras
from keras import layers


def mlp(hidden_dim: int, output_dim: int, num_layers: int = 2, batch_norm: bool = False,
        last_batch_norm: bool = False, name: str = "head") -> keras.Sequential:
    """Linear(-BN)-ReLU blocks, then a final Linear (optionally followed by BN).

    MoCo v2: mlp(2048, 128) without BN. SimCLR: BN after hidden layers. BYOL's
    projector and predictor: mlp(4096, 256, batch_norm=True). Barlow Twins: 3 layers
    with BN.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    blocks = []
    for i in range(num_layers - 1):
        blocks.append(layers.Dense(hidden_dim, use_bias=not batch_norm, name=f"{name}_dense{i + 1}"))
        if batch_norm:
            blocks.append(layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn{i + 1}"))
        blocks.append(layers.ReLU(name=f"{name}_relu{i + 1}"))
    blocks.append(layers.Dense(output_dim, use_bias=not last_batch_norm, name=f"{name}_out"))
    if last_batch_norm:
        blocks.append(layers.BatchNormalization(momentum=0.9, epsilon=1e-5, center=False, scale=False,
                                                name=f"{name}_out_bn"))
    return keras.Sequential(blocks, name=name)
