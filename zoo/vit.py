"""Vision Transformer encoders (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

The image is cut into p x p patches, each linearly embedded (a p x p convolution with
stride p, initialized as MAE's Linear layer: `patch_embed_initializer`), fixed 2-D
sine-cosine position embeddings are added (as MAE does, He et al. 2022), and pre-norm
Transformer blocks (LayerNorm -> multi-head self-attention, LayerNorm -> GELU MLP, each
residual) process the tokens; a final LayerNorm and the mean over tokens give the pooled
features. There is no class token: MAE reports the same results with
average pooling, and the zoo's encoders all end in a pooled vector.

Sizes (DeiT's): tiny = 192 dims, 3 heads; small = 384, 6; both 12 blocks, MLP ratio 4.
`width` scales the dimension (heads keep 64 dims each, at least one head), `depth`
overrides the block count. Names: `vit_tiny_p4` (patches of 4 px, for 28-64 px images)
and `vit_tiny_p16` (16 px, for 224 px), likewise `vit_small_*`.

Masked image modelling needs the encoder on a subset of tokens: `token_stem(encoder)`
gives images -> position-embedded tokens, `transformer_blocks(encoder)` and
`final_norm(encoder)` the rest, the same layers (and weights) the model runs.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers

SIZES = {"tiny": (192, 12), "small": (384, 12)}  # (dimension, blocks)
PATCH_SIZES = (4, 16)
HEAD_DIM = 64


def sincos_position_table(rows: int, cols: int, dim: int) -> np.ndarray:
    """[rows * cols, dim] fixed 2-D sine-cosine embeddings (MAE's): half the dimensions encode
    the row, half the column, each as sin / cos at geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"The position embedding needs a dimension divisible by 4, got {dim}.")
    frequencies = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def one_axis(positions):
        angles = positions[:, None] * frequencies[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    row, col = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(row.reshape(-1)), one_axis(col.reshape(-1))], axis=1).astype(np.float32)


@keras.saving.register_keras_serializable(package="ssl_zoo")
class SinCosPositionEmbedding(layers.Layer):
    """Adds the fixed `sincos_position_table` of a rows x cols token grid (no weights)."""

    def __init__(self, rows, cols, **kwargs):
        super().__init__(**kwargs)
        self.rows, self.cols = int(rows), int(cols)

    def build(self, input_shape):
        self.table = sincos_position_table(self.rows, self.cols, int(input_shape[-1]))

    def call(self, tokens):
        return tokens + keras.ops.cast(self.table, tokens.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "rows": self.rows, "cols": self.cols}


@keras.saving.register_keras_serializable(package="ssl_zoo")
class TransformerBlock(layers.Layer):
    """Pre-norm Transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.norm_1 = layers.LayerNormalization(epsilon=1e-6, name="norm_1")
        self.attention = layers.MultiHeadAttention(self.num_heads, self.dim // self.num_heads, name="attention")
        self.norm_2 = layers.LayerNormalization(epsilon=1e-6, name="norm_2")
        self.mlp_hidden = layers.Dense(int(self.dim * self.mlp_ratio), activation="gelu", name="mlp_hidden")
        self.mlp_out = layers.Dense(self.dim, name="mlp_out")

    def build(self, input_shape):
        self.norm_1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.norm_2.build(input_shape)
        self.mlp_hidden.build(input_shape)
        self.mlp_out.build((*input_shape[:-1], int(self.dim * self.mlp_ratio)))

    def call(self, x, training=False):
        y = self.norm_1(x)
        x = x + self.attention(y, y, training=training)
        return x + self.mlp_out(self.mlp_hidden(self.norm_2(x)))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio}


def parse(name: str) -> tuple[str, int]:
    """'vit_tiny_p4' -> ('tiny', 4)."""
    parts = name.split("_")
    if len(parts) != 3 or parts[0] != "vit" or parts[1] not in SIZES or parts[2] not in {f"p{p}" for p in PATCH_SIZES}:
        raise ValueError(f"Unknown ViT {name!r}: expected vit_<{'|'.join(SIZES)}>_p<{'|'.join(map(str, PATCH_SIZES))}>.")
    return parts[1], int(parts[2][1:])


def patch_embed_initializer(patch: int, channels: int, dim: int):
    """MAE's init of the patch embedding: Glorot-uniform of the Linear layer it is, on the flattened
    [C * p * p, dim] weight, limit sqrt(6 / (C p^2 + dim)). Keras's default for a Conv2D counts both
    fans times p^2: its weights would be ~3.5-4x smaller with 4-px patches, 7-10x with 16-px ones."""
    limit = math.sqrt(6.0 / (channels * patch * patch + dim))
    return keras.initializers.RandomUniform(-limit, limit)


def build_vit(name: str, input_shape, width: float, normalization: layers.Layer, depth: int | None = None):
    """images [N, H, W, C] in [0, 255] -> pooled features [N, dim]; see the module docstring."""
    size, patch = parse(name)
    height, width_px, _ = input_shape
    if height % patch or width_px % patch:
        raise ValueError(f"{name} cuts {patch} px patches: the image side must be a multiple of {patch}, got "
                         f"{height}x{width_px} (resize with --image_size).")
    base_dim, base_depth = SIZES[size]
    heads = max(1, round(base_dim * width / HEAD_DIM))
    dim = heads * max(4, 4 * math.ceil(base_dim * width / heads / 4))  # divisible by heads and by 4
    rows, cols = height // patch, width_px // patch

    images = keras.Input(shape=input_shape, name="images")
    x = normalization(images)
    x = layers.Conv2D(dim, patch, strides=patch, name="patch_embed",
                      kernel_initializer=patch_embed_initializer(patch, input_shape[-1], dim))(x)
    x = layers.Reshape((rows * cols, dim), name="patch_tokens")(x)
    x = SinCosPositionEmbedding(rows, cols, name="position")(x)
    for i in range(depth or base_depth):
        x = TransformerBlock(dim, heads, name=f"block{i + 1}")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    features = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(images, features, name=f"{name}_w{width:g}".replace(".", "p"))


def token_stem(encoder: keras.Model):
    """images -> position-embedded patch tokens [N, rows * cols, dim], with the encoder's layers."""
    parts = [encoder.get_layer(n) for n in ("normalize", "patch_embed", "patch_tokens", "position")]

    def stem(images):
        x = images
        for layer in parts:
            x = layer(x)
        return x

    return stem


def transformer_blocks(encoder: keras.Model) -> list:
    return [layer for layer in encoder.layers if isinstance(layer, TransformerBlock)]


def final_norm(encoder: keras.Model):
    return encoder.get_layer("norm")


def patch_size(encoder: keras.Model) -> int:
    return int(encoder.get_layer("patch_embed").kernel_size[0])
