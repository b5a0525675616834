"""A small encoder for the tests of recipe mechanics."""

import keras


def small_encoder(shape=(16, 16, 1), norm="batch"):
    """conv-norm-ReLU, one residual block, conv-norm-ReLU at stride 2, global average pool.

    What the recipes need of an encoder (normalization layers for split BatchNorm, a
    residual addition for stochastic depth, any input size for multi-crop and patches)
    at a third of ResNet-18's tracing time: SimCLR's 1-vs-2-replica test took 77 s with
    resnet18_small at width 0.125 and 23 s with this on a 2-core EPYC. The backbones
    themselves are tested in test_zoo_backbones and through the training CLI.
    """
    def conv_norm(x, filters, strides=1):
        x = keras.layers.Conv2D(filters, 3, strides, padding="same", use_bias=False)(x)
        # norm="layer" as zoo.backbones builds it (CPC v2's encoder): one group over all channels.
        return (keras.layers.GroupNormalization(groups=1) if norm == "layer" else keras.layers.BatchNormalization())(x)

    images = keras.Input(shape)
    x = keras.layers.ReLU()(conv_norm(images, 8))
    x = keras.layers.ReLU()(keras.layers.Add()([x, conv_norm(x, 8)]))
    x = keras.layers.ReLU()(conv_norm(x, 16, strides=2))
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(x))
