"""Learning to count: the counts of visual primitives in an image equal the sum over its tiles.

Noroozi, Pirsiavash, Favaro 2017, "Representation Learning by Learning to Count" (ICCV).

A network phi maps an image to a vector of non-negative "counts" (ReLU outputs). Cut an
image x into 2 x 2 tiles T_1..T_4 and downsample it by 2 (D x, the tiles' size): the
features in x are the features in its tiles, so phi(D x) should equal sum_j phi(T_j x).
phi = 0 would satisfy that, so a contrastive term asks the counts of another image y to
differ by at least a margin (`recipes.losses.counting_loss`; y is the next image of the
global batch). To stop phi from telling a downsampled image from a tile by its
resampling artefacts, each image is downsampled with a method drawn at random (here:
area averaging or bilinear), as the paper draws among several.

phi here: the encoder (run on half-size inputs; any-size pooling, i.e. a ResNet) and a
ReLU layer of `count_dim` counts (the paper's AlexNet ends in 1000).
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


def downsample(images, use_area):
    """[B, S, S, C] -> [B, S/2, S/2, C], per image by 2 x 2 area averaging or bilinear sampling."""
    half = images.shape[1] // 2
    area = tf.nn.avg_pool2d(images, 2, 2, "VALID")
    bilinear = tf.image.resize(images, (half, half), method="bilinear", antialias=False)
    return tf.where(use_area[:, None, None, None], area, tf.cast(bilinear, area.dtype))


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

    def _counts(self, images):
        return self.encode_in_groups(lambda x, training: self.counter(self.half_encoder(x, training=training)),
                                     images, self.bn_splits or self.num_replicas)

    def loss_terms(self, data):
        images = tf.cast(data["image"], self.compute_dtype)
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        use_area = distribute.replica_slice(
            tf.random.stateless_uniform([global_batch], self.step_seed(1)) < 0.5, local_batch)
        whole = self._counts(downsample(images, use_area))
        tiles = tiles_2x2(images)  # image-major rows, so BN groups hold whole images' tiles
        tile_counts = self._counts(tf.reshape(tiles, [-1, *tiles.shape[2:]]))
        tiles_sum = tf.reduce_sum(tf.reshape(tile_counts, [local_batch, 4, self.count_dim]), axis=1)
        # y: the next image of the global batch (gathered with gradient), its counts must differ
        other = distribute.replica_slice(tf.roll(distribute.all_gather(whole), -1, axis=0), local_batch)
        losses = counting_loss(whole, tiles_sum, other, self.margin)
        return tf.reduce_sum(losses) / global_batch, {}
