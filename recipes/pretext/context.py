"""Context prediction: learn features by telling where one patch sits relative to another.

Doersch, Gupta, Efros 2015, "Unsupervised Visual Representation Learning by Context
Prediction" (ICCV).

From the 3x3 tile grid of an image (`recipes.pretext.tiles`: gaps and jitter, so that
edges cannot be matched across a border) the centre tile and one of its 8 neighbours,
drawn at random, go through the same encoder and a per-tile layer (fc6, as in the
paper's two AlexNet towers); their concatenation is classified into the 8 possible
places of the neighbour (fc7, fc8; cross-entropy). Recognizing that a wheel sits below
a car door, not above it, needs the encoder to recognize parts of objects.

The paper also fought "chromatic aberration", colour fringes that give a patch's
position in the lens away, by dropping colour from some patches; with the 28-px
greyscale images here there is none to fight, and `grayscale_p` applies it to colour ones.
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.augment import gray
from recipes.base import Recipe, register
from recipes.losses import pretext_cross_entropy
from recipes.pretext.tiles import GRID, TileSetClassifier, grid_tiles, tile_encoder

CENTRE = GRID * GRID // 2
NEIGHBOURS = [place for place in range(GRID * GRID) if place != CENTRE]  # class k = NEIGHBOURS[k]


def centre_and_neighbour(tiles, labels):
    """[B, 9, t, t, C] grid tiles, [B] classes -> [B, 2, t, t, C]: the centre tile and the
    neighbour at place NEIGHBOURS[label]."""
    neighbour = tf.gather(tf.constant(NEIGHBOURS, tf.int32), labels)
    return tf.stack([tiles[:, CENTRE], tf.gather(tiles, neighbour, batch_dims=1)], axis=1)


@register("context")
class ContextPrediction(Recipe):
    """Relative position of a neighbouring tile to the centre tile (8 classes).

    Args:
      encoder: backbone to pretrain (runs on single tiles: any-size pooling, i.e. a ResNet).
      tile_dim: width of the per-tile layer fc6 (4096 in the paper's AlexNet).
      hidden_dim: width of fc7 on the pair (4096 in the paper).
      grayscale_p: probability of dropping a colour image's colour (both tiles alike).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      seed: augmentation seed (tile jitter, the neighbour drawn per image).
    """

    def __init__(self, encoder, tile_dim=512, hidden_dim=1024, grayscale_p=0.33, bn_splits=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.tile_dim, self.hidden_dim = int(tile_dim), int(hidden_dim)
        self.grayscale_p = float(grayscale_p)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.network = TileSetClassifier(tile_encoder(encoder, "Context prediction"), 2, self.tile_dim,
                                         self.hidden_dim, len(NEIGHBOURS), name="pair_network")
        self.accuracy_tracker = keras.metrics.Mean(name="position_acc")

    def get_config(self):
        return {**super().get_config(), "tile_dim": self.tile_dim, "hidden_dim": self.hidden_dim,
                "grayscale_p": self.grayscale_p, "bn_splits": self.bn_splits}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def position_logits(self, pairs, training=True):
        """[B, 2, t, t, C] (centre, neighbour) tiles -> [B, 8] logits of the neighbour's place."""
        return self.encode_in_groups(self.network, pairs, self.bn_splits or self.num_replicas, training=training)

    def loss_terms(self, data):
        images = data["image"]
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        tiles = tf.cast(grid_tiles(images, self.step_seed(1), global_batch), self.compute_dtype)
        if tiles.shape[-1] == 3 and self.grayscale_p > 0:
            drop = distribute.replica_slice(
                tf.random.stateless_uniform([global_batch], self.step_seed(3)) < self.grayscale_p, local_batch)
            tiles = tf.where(drop[:, None, None, None, None], tf.tile(gray(tiles), [1, 1, 1, 1, 3]), tiles)
        labels = distribute.replica_slice(tf.random.stateless_uniform(
            [global_batch], self.step_seed(2), 0, len(NEIGHBOURS), tf.int32), local_batch)
        logits = self.position_logits(centre_and_neighbour(tiles, labels))
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32)
        self.accuracy_tracker.update_state(hits)
        return tf.reduce_sum(pretext_cross_entropy(logits, labels)) / global_batch, {}
