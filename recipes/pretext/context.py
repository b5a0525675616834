"""Context prediction: learn features by telling where one patch sits relative to another.

Doersch, Gupta, Efros 2015, "Unsupervised Visual Representation Learning by Context
Prediction" (ICCV).

From the 3x3 tile grid of an image (`recipes.pretext.tiles`: gaps and jitter, so that
edges cannot be matched across a border) the centre tile and one of its 8 neighbours,
drawn at random, go through the same encoder and a per-tile layer (fc6, as in the
paper's two AlexNet towers); their concatenation is classified into the 8 possible
places of the neighbour by fc7 and the 8-way fc8 (cross-entropy); the released code
(cdoersch/deepcontext) has one layer more there (fc7 4096, fc8 4096, fc9 8).
Recognizing that a wheel sits below a car door, not above it, needs the encoder to
recognize parts of objects.

Against "chromatic aberration" (colour fringes that give a patch's place in the lens
away) the paper projected or dropped colour (sec. 3.1); the released code drops it from
every patch: one channel, drawn per patch, is kept and centred, the other two become
noise uniform in [-0.5, 0.5] grey levels, and the patch is scaled to a fixed RMS.
`colour_drop` does this to colour tiles (RMS 64 around 127.5); other tiles are
standardized each on its own (`tiles.standardize_tiles`). Not done here: the released
code's blurring of a third of the patches.
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.base import Recipe, register
from recipes.losses import pretext_cross_entropy
from recipes.pretext.tiles import GRID, TileSetClassifier, grid_tiles, standardize_tiles, tile_encoder

CENTRE = GRID * GRID // 2
NEIGHBOURS = [place for place in range(GRID * GRID) if place != CENTRE]  # class k = NEIGHBOURS[k]


def centre_and_neighbour(tiles, labels):
    """[B, 9, t, t, C] grid tiles, [B] classes -> [B, 2, t, t, C]: the centre tile and the
    neighbour at place NEIGHBOURS[label]."""
    neighbour = tf.gather(tf.constant(NEIGHBOURS, tf.int32), labels)
    return tf.stack([tiles[:, CENTRE], tf.gather(tiles, neighbour, batch_dims=1)], axis=1)


def colour_drop_draws(seed, global_batch: int, local_batch: int, tile_shape, tiles: int = 2):
    """This replica's rows of the global batch's draws for `tiles` tiles per image (the
    centre and its neighbour): the channel each tile keeps, [B, tiles] int32 in {0, 1, 2},
    and the noise of the other channels, [B, tiles, t, t, 3] uniform in [-0.5, 0.5)."""
    keep_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    keep = tf.random.stateless_uniform([global_batch, tiles], keep_seed, 0, 3, tf.int32)
    noise = tf.random.stateless_uniform([global_batch, tiles, *tile_shape, 3], noise_seed, -0.5, 0.5)
    return distribute.replica_slice(keep, local_batch), distribute.replica_slice(noise, local_batch)


def drop_colour(tiles, keep, noise, epsilon=1.0):
    """[B, n, t, t, 3] tiles in [0, 255] -> each tile's channel keep[b, i] minus its mean, the
    other channels `noise`, the whole tile scaled to RMS 64 and shifted to 127.5 (`epsilon`
    added to the mean square, so flat tiles are not blown up)."""
    kept = tf.equal(tf.range(3), keep[:, :, None, None, None])  # [B, n, 1, 1, 3]
    x = tf.where(kept, tiles - tf.reduce_mean(tiles, axis=[-3, -2], keepdims=True), tf.cast(noise, tiles.dtype))
    return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=[-3, -2, -1], keepdims=True) + epsilon) * 64.0 + 127.5


@register("context")
class ContextPrediction(Recipe):
    """Relative position of a neighbouring tile to the centre tile (8 classes).

    Args:
      encoder: backbone to pretrain (runs on single tiles: any-size pooling, i.e. a ResNet).
      tile_dim: width of the per-tile layer fc6 (4096 in the paper's AlexNet).
      hidden_dim: width of fc7 on the pair (4096 in the released code).
      colour_drop: drop colour from every colour tile (keep one random channel, noise in
        the others), as the released code does; greyscale images are not affected.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      seed: augmentation seed (tile jitter, the neighbour drawn per image, colour dropping).
    """

    def __init__(self, encoder, tile_dim=512, hidden_dim=1024, colour_drop=True, bn_splits=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.tile_dim, self.hidden_dim = int(tile_dim), int(hidden_dim)
        self.colour_drop = bool(colour_drop)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.network = TileSetClassifier(tile_encoder(encoder, "Context prediction"), 2, self.tile_dim,
                                         self.hidden_dim, len(NEIGHBOURS), name="pair_network")
        self.accuracy_tracker = keras.metrics.Mean(name="position_acc")

    def get_config(self):
        return {**super().get_config(), "tile_dim": self.tile_dim, "hidden_dim": self.hidden_dim,
                "colour_drop": self.colour_drop, "bn_splits": self.bn_splits}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def position_logits(self, pairs, training=True):
        """[B, 2, t, t, C] (centre, neighbour) tiles -> [B, 8] logits of the neighbour's place."""
        return self.encode_in_groups(self.network, pairs, self.bn_splits or self.num_replicas, training=training)

    def normalized_pairs(self, images, labels, global_batch: int):
        """[B, S, S, C] images, [B] classes -> [B, 2, t, t, C] (centre, neighbour) tiles of the
        compute dtype, colour dropped (colour images, `colour_drop`) or standardized, each on
        its own. Only the two tiles the pair uses are normalized."""
        tiles = tf.cast(grid_tiles(images, self.step_seed(1), global_batch), self.compute_dtype)
        pairs = centre_and_neighbour(tiles, labels)
        if pairs.shape[-1] == 3 and self.colour_drop:
            return drop_colour(pairs, *colour_drop_draws(self.step_seed(3), global_batch, images.shape[0],
                                                         pairs.shape[2:4]))
        return standardize_tiles(pairs)

    def loss_terms(self, data):
        images = data["image"]
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        labels = distribute.replica_slice(tf.random.stateless_uniform(
            [global_batch], self.step_seed(2), 0, len(NEIGHBOURS), tf.int32), local_batch)
        logits = self.position_logits(self.normalized_pairs(images, labels, global_batch))
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32)
        self.accuracy_tracker.update_state(hits)
        return tf.reduce_sum(pretext_cross_entropy(logits, labels)) / global_batch, {}
