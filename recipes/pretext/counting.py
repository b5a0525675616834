"""Learning to count: the counts of visual primitives in an image equal the sum over its tiles.

Noroozi, Pirsiavash, Favaro 2017, "Representation Learning by Learning to Count" (ICCV).

A network phi maps an image to a vector of non-negative "counts" (ReLU outputs). Cut an
image x into 2 x 2 tiles T_1..T_4 and downsample it by 2 (D x, the tiles' size): the
features in x are the features in its tiles, so phi(D x) should equal sum_j phi(T_j x).
phi = 0 would satisfy that, so a contrastive term asks the counts of another image y to
differ by at least a margin (`recipes.losses.counting_loss`; y is the next image of the
global batch). To stop phi from telling a downsampled image from a tile by its
resampling artefacts, each image is downsampled with a method drawn at random, as the
paper draws among several: 2 x 2 area averaging, nearest neighbour, bicubic, Lanczos-5 and
antialiased bilinear (`DOWNSAMPLING`; a plain bilinear resize by exactly 2 samples between
pixel pairs and equals area averaging, so it is not a method of its own).

phi here: the encoder (run on half-size inputs; any-size pooling, i.e. a ResNet) and a
ReLU layer of `count_dim` counts (the paper's AlexNet ends in 1000). D x and the four tiles
go through phi in one call (image-major rows, each image's five inputs in one BatchNorm
group), so in training they are normalized with the same batch statistics: with two calls
phi(D x) and phi(T_j x) would be two slightly different functions, and the relation is
about one.
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.base import Recipe, register
from recipes.heads import at_input_shape
from recipes.losses import counting_loss


def tiles_2x2(images):
    """[B, S, S, C] -> [B, 4, S/2, S/2, C]: top-left, top-right, bottom-left, bottom-right."""
    half = images.shape[1] // 2
    return tf.stack([images[:, r * half:(r + 1) * half, c * half:(c + 1) * half] for r in (0, 1) for c in (0, 1)],
                    axis=1)


# The downsampling methods drawn from, per image: (tf.image.resize method, antialias), "area" = 2 x 2 mean.
DOWNSAMPLING = (("area", False), ("nearest", False), ("bicubic", False), ("lanczos5", False), ("bilinear", True))


def downsample(images, method):
    """[B, S, S, C] -> [B, S/2, S/2, C], image i by DOWNSAMPLING[method[i]]."""
    half = images.shape[1] // 2
    variants = [tf.nn.avg_pool2d(images, 2, 2, "VALID") if name == "area" else
                tf.cast(tf.image.resize(images, (half, half), method=name, antialias=antialias), images.dtype)
                for name, antialias in DOWNSAMPLING]
    return tf.gather(tf.stack(variants, axis=1), method, axis=1, batch_dims=1)


@register("counting")
class Counting(Recipe):
    """Counting visual primitives across scale and tiling.

    Args:
      encoder: backbone to pretrain.
      count_dim: number of counts, the ReLU layer on the encoder (1000 in the paper).
      margin: M of the contrastive term (10).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      seed: augmentation seed (the downsampling method per image).
    """

    def __init__(self, encoder, count_dim=1000, margin=10.0, bn_splits=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.count_dim, self.margin = int(count_dim), float(margin)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        height, width, channels = encoder.input_shape[1:]
        if height != width or height % 2:
            raise ValueError(f"Counting cuts 2 x 2 tiles of a square image with an even side; the encoder takes "
                             f"{height}x{width} images.")
        self.half_encoder = at_input_shape(encoder, (height // 2, width // 2, channels))
        self.counter = keras.layers.Dense(self.count_dim, activation="relu", name="counts")
        self.counter.build((None, encoder.output_shape[-1]))

    def get_config(self):
        return {**super().get_config(), "count_dim": self.count_dim, "margin": self.margin,
                "bn_splits": self.bn_splits}

    def loss_terms(self, data):
        images = tf.cast(data["image"], self.compute_dtype)
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        method = distribute.replica_slice(tf.random.stateless_uniform(
            [global_batch], self.step_seed(1), 0, len(DOWNSAMPLING), dtype=tf.int32), local_batch)
        # [B, 5, S/2, S/2, C]: D x, then the 4 tiles; image-major rows, so a BN group holds whole images
        inputs = tf.concat([downsample(images, method)[:, None], tiles_2x2(images)], axis=1)
        counts = self.encode_in_groups(lambda x, training: self.counter(self.half_encoder(x, training=training)),
                                       tf.reshape(inputs, [-1, *inputs.shape[2:]]), self.bn_splits or self.num_replicas)
        counts = tf.reshape(counts, [local_batch, 5, self.count_dim])
        whole, tiles_sum = counts[:, 0], tf.reduce_sum(counts[:, 1:], axis=1)
        # y: the next image of the global batch (gathered with gradient), its counts must differ
        other = distribute.replica_slice(tf.roll(distribute.all_gather(whole), -1, axis=0), local_batch)
        losses = counting_loss(whole, tiles_sum, other, self.margin)
        return tf.reduce_sum(losses) / global_batch, {}
