"""Named image encoders, built from code with no downloads.

Vision Transformers (`vit_*`, zoo/vit.py) for masked image modelling; and
ResNet-18/50 (He et al. 2016, "Deep Residual Learning for Image Recognition") in two
stems: the ImageNet stem (7x7/2 convolution + 3x3/2 max-pool) for 96 px and larger
inputs, and the small-image stem (one 3x3/1 convolution, no max-pool) that CIFAR-style
self-supervised work uses for 28-64 px inputs, where the ImageNet stem would throw
away most of the image before the first block.

Every encoder takes images with values in [0, 255] (uint8 or float) of a fixed shape,
normalizes them inside the model (so a served or reloaded encoder needs no outside
preprocessing), and returns the globally pooled feature vector: the representation
that self-supervised papers evaluate with kNN and linear probes, before any
projection head.
"""

from __future__ import annotations

import keras
from keras import layers

from zoo import vit  # the ViT encoders; importing registers their layers, so saved ViTs load

# BatchNorm settings of the reference PyTorch ResNets (momentum 0.1 there = 0.9 here).
_BN = dict(momentum=0.9, epsilon=1e-5)

# (block kind, blocks per stage)
_DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
_STEMS = ("imagenet", "small")

BACKBONES = ("resnet18", "resnet50", "resnet18_small", "resnet50_small",
             "vit_tiny_p4", "vit_small_p4", "vit_tiny_p16", "vit_small_p16")  # ViTs: zoo/vit.py

# Normalization after each convolution. "batch": BatchNorm, the ResNet default. "layer":
# each example normalized over its own H x W x C with per-channel scale and offset
# (GroupNorm with one group; TF's `layer_norm` over a conv map), so no example's output
# depends on the rest of the batch. CPC v2 (Henaff et al. 2019, sec. 4) uses it: with
# BatchNorm, patches of one image share statistics with the patches they must predict.
NORMS = ("batch", "layer")


@keras.saving.register_keras_serializable(package="ssl_zoo")
class ImageNormalization(layers.Layer):
    """Maps [0, 255] pixels to (x / 255 - mean) / std per channel, in the layer's dtype.

    Living inside the encoder, it travels with every exported artifact, so callers
    always send raw pixel values.
    """

    def __init__(self, mean=0.5, std=0.25, **kwargs):
        super().__init__(**kwargs)
        self.mean = mean
        self.std = std

    def call(self, images):
        dtype = self.compute_dtype
        x = keras.ops.cast(images, dtype) / 255.0
        return (x - keras.ops.convert_to_tensor(self.mean, dtype)) / keras.ops.convert_to_tensor(
            self.std, dtype
        )

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="ssl_zoo")
class StochasticDepthAdd(layers.Layer):
    """shortcut + branch, where training drops the whole branch per example with prob `rate`.

    Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"): a
    residual block is skipped for some examples of each training batch; kept branches
    are scaled by 1 / (1 - rate) so inference (the plain sum) needs no rescaling.
    Noisy Student uses it as model noise. Expects inputs [shortcut, branch].
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"Stochastic depth rate must be in [0, 1), got {rate!r}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        shortcut, branch = inputs
        if not training or self.rate == 0.0:
            return shortcut + branch
        rows = keras.ops.shape(branch)[:1]
        keep = keras.random.uniform(rows, seed=self.seed_generator) >= self.rate
        scale = keras.ops.cast(keep, branch.dtype) / (1.0 - self.rate)
        return shortcut + branch * keras.ops.reshape(scale, (-1, 1, 1, 1))

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def with_stochastic_depth(encoder: keras.Model, final_rate: float, seed: int = 0) -> keras.Model:
    """A copy of `encoder` (same weights) whose residual blocks drop out during training.

    Rates grow linearly with depth to `final_rate` at the last block (the "linear decay"
    rule of Huang et al.; Noisy Student: survival 0.8 at the last block, i.e. 0.2).
    Works on any encoder from `build` or the zoo; inference outputs are unchanged.
    `final_rate=0` gives a plain copy (no custom layer), e.g. to publish.
    """
    adds = [layer.name for layer in encoder.layers if isinstance(layer, (layers.Add, StochasticDepthAdd))]
    if not adds:
        raise ValueError(f"{encoder.name} has no residual additions (keras.layers.Add) for stochastic depth; "
                         "use an encoder from zoo.backbones, or turn stochastic depth off (rate 0).")
    depth = {name: i + 1 for i, name in enumerate(adds)}  # 1 = first block

    def clone(layer):
        if layer.name in depth and final_rate > 0:
            rate = final_rate * depth[layer.name] / len(adds)
            return StochasticDepthAdd(rate, seed=seed + depth[layer.name] - 1, name=layer.name)
        if layer.name in depth:  # final_rate 0: back to the plain sum, e.g. for export
            return layers.Add(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    noisy = keras.models.clone_model(encoder, clone_function=clone)
    noisy.set_weights(encoder.get_weights())
    return noisy


def _conv_norm(x, filters, kernel, strides, name, norm, relu=True):
    x = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    if norm == "layer":
        x = layers.GroupNormalization(groups=1, epsilon=_BN["epsilon"], name=f"{name}_ln")(x)
    else:
        x = layers.BatchNormalization(**_BN, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, strides, name, norm):
    shortcut = x
    y = _conv_norm(x, filters, 3, strides, f"{name}_1", norm)
    y = _conv_norm(y, filters, 3, 1, f"{name}_2", norm, relu=False)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_norm(x, filters, 1, strides, f"{name}_proj", norm, relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def _bottleneck_block(x, filters, strides, name, norm):
    out_filters = 4 * filters
    shortcut = x
    y = _conv_norm(x, filters, 1, 1, f"{name}_1", norm)
    y = _conv_norm(y, filters, 3, strides, f"{name}_2", norm)
    y = _conv_norm(y, out_filters, 1, 1, f"{name}_3", norm, relu=False)
    if strides != 1 or x.shape[-1] != out_filters:
        shortcut = _conv_norm(x, out_filters, 1, strides, f"{name}_proj", norm, relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def _parse(name: str) -> tuple[str, str]:
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}. Valid backbones: {', '.join(BACKBONES)}.")
    depth, _, stem = name.partition("_")
    return depth, stem or "imagenet"


def build(name: str, input_shape, width: float = 1.0, mean=None, std=None, norm: str = "batch",
          depth: int | None = None) -> keras.Model:
    """Builds the named encoder.

    Args:
      name: one of `BACKBONES`; a `_small` suffix selects the 3x3 stem without max-pool.
      input_shape: (H, W, C) of the images the encoder takes.
      width: channel multiplier on the standard widths 64-128-256-512 (CPU-sized
        encoders use 0.25-0.5).
      mean, std: per-image-channel normalization statistics in [0, 1] units; scalars or
        length-C lists. Defaults map [0, 255] to roughly [-2, 2].
      norm: "batch" (BatchNorm) or "layer" (per-example normalization, see `NORMS`);
        a layer-norm encoder's name ends in "_ln". ResNets only: ViTs use LayerNorm.
      depth: ViTs only, Transformer blocks (default 12).

    Returns:
      A `keras.Model` from images (N, H, W, C) in [0, 255] to features (N, D).

    Example:
      >>> encoder = build("resnet18_small", (28, 28, 1), width=0.25)
      >>> encoder.output_shape
      (None, 128)
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}. Valid backbones: {', '.join(BACKBONES)}.")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}.")
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}. Valid norms: {', '.join(NORMS)}.")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape}.")
    normalization = ImageNormalization(mean=0.5 if mean is None else mean, std=0.25 if std is None else std,
                                       name="normalize")
    if name.startswith("vit_"):
        return vit.build_vit(name, input_shape, width, normalization, depth)
    if depth is not None:
        raise ValueError(f"depth applies to ViTs; {name} has a fixed depth.")
    resnet_depth, stem = _parse(name)
    block_kind, blocks_per_stage = _DEPTHS[resnet_depth]
    block = _basic_block if block_kind == "basic" else _bottleneck_block

    images = keras.Input(shape=input_shape, name="images")
    x = normalization(images)
    stem_filters = max(8, int(round(64 * width)))
    if stem == "small":
        x = _conv_norm(x, stem_filters, 3, 1, "stem", norm)
    else:
        x = _conv_norm(x, stem_filters, 7, 2, "stem", norm)
        x = layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
    for stage, num_blocks in enumerate(blocks_per_stage):
        filters = max(8, int(round(64 * width * 2**stage)))
        for i in range(num_blocks):
            strides = 2 if (i == 0 and stage > 0) else 1
            x = block(x, filters, strides, name=f"stage{stage + 1}_block{i + 1}", norm=norm)
    features = layers.GlobalAveragePooling2D(name="pool")(x)
    suffix = "_ln" if norm == "layer" else ""
    return keras.Model(images, features, name=f"{name}_w{width:g}{suffix}".replace(".", "p"))
