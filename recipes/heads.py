"""Projection and prediction heads: small MLPs that sit on the encoder during training.

They are thrown away after pretraining (the zoo publishes the encoder only), but the
loss is computed on their output: Chen et al. 2020 (SimCLR) showed a nonlinear
projection makes the encoder's own features better, and MoCo v2 adopted it.
"""

import keras
from keras import layers

from zoo import vit


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


def at_input_shape(encoder: keras.Model, input_shape, name=None) -> keras.Model:
    """The same encoder (the same layers and weights) taking images of another shape.

    A functional encoder checks its inputs against the shape it was built with, but
    a convolutional trunk with global pooling is defined on any size. Multi-crop
    (DINO's smaller local views) and CPC's patches need the encoder on other sizes;
    rebuilding the graph on a new `keras.Input` shares every layer, so gradients
    reach the one set of weights the zoo publishes.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if tuple(encoder.input_shape[1:]) == input_shape:
        return encoder
    if vit.transformer_blocks(encoder):
        built = "x".join(map(str, encoder.input_shape[1:]))
        raise ValueError(f"This recipe runs the encoder on {'x'.join(map(str, input_shape))} crops, patches or "
                         f"tiles, but {encoder.name} is a Vision Transformer, whose position table fixes it to "
                         f"{built} images. Use a convolutional backbone (e.g. --backbone=resnet18_small).")
    images = keras.Input(shape=input_shape, name="images")
    return keras.Model(images, encoder.call(images), name=name or f"{encoder.name}_at_{'x'.join(map(str, input_shape))}")


@keras.saving.register_keras_serializable(package="ssl_recipes")
class WeightNormDense(layers.Layer):
    """A bias-free linear layer with weight normalization (Salimans & Kingma 2016).

    W = g * v / ||v|| column by column. DINO's last layer: with `fixed_norm=True`
    (the paper's `norm_last_layer`) g is frozen at 1, so every prototype has unit
    norm and the logits are cosines, which stabilizes training.
    """

    def __init__(self, units: int, fixed_norm: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.fixed_norm = bool(fixed_norm)

    def build(self, input_shape):
        self.direction = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform",
                                         name="direction")
        self.magnitude = self.add_weight(shape=(self.units,), initializer="ones", name="magnitude",
                                         trainable=not self.fixed_norm)

    def call(self, x):
        w = self.direction / keras.ops.sqrt(keras.ops.sum(keras.ops.square(self.direction), axis=0) + 1e-12)
        return keras.ops.matmul(x, w * self.magnitude)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "fixed_norm": self.fixed_norm}


def dino_head(output_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
              num_layers: int = 3, norm_last_layer: bool = True, batch_norm: bool = False,
              name: str = "dino_head") -> keras.Sequential:
    """DINO's projection head (Caron et al. 2021, sec. 3.1 and fig. 9).

    A `num_layers` MLP (hidden 2048, GELU) down to a 256-d bottleneck, L2
    normalization, then a weight-normalized linear layer to K = `output_dim`
    prototypes. The paper's ViT head has no BN; `batch_norm=True` puts BN after each
    hidden linear layer (the paper code's `use_bn_in_head`), for encoders whose pooled
    features all point the same way, as a fresh ResNet's do (post-ReLU means dominate):
    BN removes that shared direction, so different images reach different prototypes
    from init (benchmarks/dino_teacher_at_init.py measures it).
    """
    blocks = []
    for i in range(num_layers - 1):
        if batch_norm:
            blocks.append(layers.Dense(hidden_dim, use_bias=False, name=f"{name}_dense{i + 1}"))
            blocks.append(layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn{i + 1}"))
            blocks.append(layers.Activation("gelu", name=f"{name}_gelu{i + 1}"))
        else:
            blocks.append(layers.Dense(hidden_dim, activation="gelu", name=f"{name}_dense{i + 1}"))
    blocks.append(layers.Dense(bottleneck_dim, name=f"{name}_bottleneck"))
    # float32 under mixed precision: in float16 the squared norm overflows past ~256 per
    # coordinate and Keras's epsilon (1e-12) underflows to 0, giving zeros or NaN.
    blocks.append(layers.UnitNormalization(axis=-1, name=f"{name}_l2", dtype="float32"))
    blocks.append(WeightNormDense(output_dim, fixed_norm=norm_last_layer, name=f"{name}_prototypes"))
    return keras.Sequential(blocks, name=name)
