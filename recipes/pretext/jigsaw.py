"""Jigsaw puzzles: learn features by putting 9 shuffled tiles of an image back in order.

Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles" (ECCV).

Each image gives a 3x3 grid of tiles (gaps, jitter, per-tile normalization:
`recipes.pretext.tiles`). One permutation out of a fixed set of P is drawn per image,
the tiles are shuffled by it, and the network must say which permutation it was
(P-way classification, cross-entropy). The network is the paper's "context-free
network": every tile goes alone through the shared encoder and a per-tile layer (fc6),
so no tile sees another before the 9 outputs are concatenated (fc7, then the P-way
fc8); the encoder thus learns what a tile shows, not how borders continue.

Against chromatic aberration the reference code (bbrattoli/JigsawPuzzlePytorch) turns
30% of the images grey, adds to each channel of each tile an integer drawn from
{-2, ..., 1} (clipped to [0, 255]) and normalizes each channel of each tile on its own.
Here `chromatic_defence` (`grayscale_p`, `channel_shift`) does the first two to colour
images, and every tile is normalized per channel; as in the reference, a shift survives
that normalization only where it clipped.

The permutation set (`permutation_set`) is the paper's Algorithm 1: starting from a
random permutation, repeatedly add the permutation with the largest total Hamming
distance to those chosen, so that the classes are as far apart as possible; P = 1000 in
the paper (100 already worked well there, table 3). It is a deterministic function of
(P, `permutation_seed`), which the zoo card records.
"""

import functools
import itertools

import keras
import numpy as np
import tensorflow as tf

from recipes import distribute
from recipes.base import Recipe, register
from recipes.losses import pretext_cross_entropy
from recipes.pretext.tiles import GRID, TileSetClassifier, grid_tiles, standardize_tiles, tile_encoder

NUM_TILES = GRID * GRID
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B in grey (PIL's "L" mode, used by the reference)


@functools.lru_cache(maxsize=8)
def permutation_set(count: int, seed: int = 0) -> np.ndarray:
    """[count, 9] permutations of the 9 tiles, chosen greedily for maximal Hamming distance."""
    every = np.array(list(itertools.permutations(range(NUM_TILES))), dtype=np.int8)  # 9! = 362,880
    if not 1 <= count <= len(every):
        raise ValueError(f"num_permutations must be in [1, {len(every)}], got {count}.")
    # holds[9 * i + v][k]: permutation k puts tile v at place i, so the number of places where
    # permutations k and q agree is the sum of holds[9 * i + q[i]] over the 9 places.
    holds = np.stack([every[:, place] == tile for place in range(NUM_TILES) for tile in range(NUM_TILES)])
    holds = holds.astype(np.int16)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(every)))]
    total_distance = np.zeros(len(every), np.int64)
    available = np.ones(len(every), bool)
    for _ in range(count - 1):
        newest = every[chosen[-1]]
        available[chosen[-1]] = False
        agreeing = sum(holds[NUM_TILES * place + newest[place]] for place in range(NUM_TILES))
        total_distance += NUM_TILES - agreeing
        chosen.append(int(np.argmax(np.where(available, total_distance, -1))))
    return every[chosen].astype(np.int32)


def shift_channels(tiles, shifts):
    """[B, n, t, t, C] tiles in [0, 255], [B, n, C] shifts -> tiles + shifts, clipped to [0, 255]."""
    return tf.clip_by_value(tiles + shifts[:, :, None, None, :], 0.0, 255.0)


def chromatic_defence(tiles, seed, global_batch: int, grayscale_p=0.3, channel_shift=2):
    """[B, 9, t, t, 3] colour tiles in [0, 255] -> the same, all 9 turned grey with probability
    `grayscale_p` per image, then each channel of each tile shifted by an integer uniform in
    [-channel_shift, channel_shift) (`shift_channels`); draws for the global batch."""
    grey_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    local_batch = tiles.shape[0]
    grey = distribute.replica_slice(tf.random.stateless_uniform([global_batch], grey_seed) < grayscale_p, local_batch)
    luminance = tf.reduce_sum(tiles * tf.constant(LUMA, tiles.dtype), axis=-1, keepdims=True)
    tiles = tf.where(grey[:, None, None, None, None], tf.tile(luminance, [1, 1, 1, 1, 3]), tiles)
    if channel_shift <= 0:
        return tiles
    shifts = tf.random.stateless_uniform([global_batch, NUM_TILES, 3], shift_seed, -channel_shift, channel_shift,
                                         tf.int32)
    return shift_channels(tiles, tf.cast(distribute.replica_slice(shifts, local_batch), tiles.dtype))


@register("jigsaw")
class Jigsaw(Recipe):
    """Jigsaw puzzle solving with a context-free network.

    Args:
      encoder: backbone to pretrain (runs on single tiles: any-size pooling, i.e. a ResNet).
      num_permutations: P classes (1000 in the paper).
      permutation_seed: seed of the permutation set's first, random, permutation.
      tile_dim: width of the per-tile layer fc6 (512 in the paper's AlexNet).
      hidden_dim: width of fc7 (4096 in the paper).
      grayscale_p: probability of turning a colour image grey (0.3 in the reference code).
      channel_shift: each channel of each colour tile is shifted by an integer in
        [-channel_shift, channel_shift) grey levels (2 in the reference code; 0: none).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      seed: augmentation seed (tile jitter, greying, channel shifts, the permutation drawn).
    """

    def __init__(self, encoder, num_permutations=1000, permutation_seed=0, tile_dim=512, hidden_dim=4096,
                 grayscale_p=0.3, channel_shift=2, bn_splits=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.num_permutations = int(num_permutations)
        self.permutation_seed = int(permutation_seed)
        self.tile_dim, self.hidden_dim = int(tile_dim), int(hidden_dim)
        self.grayscale_p, self.channel_shift = float(grayscale_p), int(channel_shift)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.permutations = tf.constant(permutation_set(self.num_permutations, self.permutation_seed))
        self.network = TileSetClassifier(tile_encoder(encoder, "Jigsaw"), NUM_TILES, self.tile_dim, self.hidden_dim,
                                         self.num_permutations, name="context_free_network")
        self.accuracy_tracker = keras.metrics.Mean(name="puzzle_acc")

    def get_config(self):
        return {**super().get_config(), "num_permutations": self.num_permutations,
                "permutation_seed": self.permutation_seed, "tile_dim": self.tile_dim, "hidden_dim": self.hidden_dim,
                "grayscale_p": self.grayscale_p, "channel_shift": self.channel_shift, "bn_splits": self.bn_splits}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def puzzle_logits(self, shuffled_tiles, training=True):
        """[B, 9, t, t, C] shuffled tiles -> [B, P] permutation logits."""
        return self.encode_in_groups(self.network, shuffled_tiles, self.bn_splits or self.num_replicas,
                                     training=training)

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        tiles = tf.cast(grid_tiles(images, self.step_seed(1), global_batch), self.compute_dtype)
        if tiles.shape[-1] == 3:
            tiles = chromatic_defence(tiles, self.step_seed(3), global_batch, self.grayscale_p, self.channel_shift)
        tiles = standardize_tiles(tiles, per_channel=True)
        labels = distribute.replica_slice(tf.random.stateless_uniform(
            [global_batch], self.step_seed(2), 0, self.num_permutations, tf.int32), images.shape[0])
        shuffled = tf.gather(tiles, tf.gather(self.permutations, labels), batch_dims=1)
        logits = self.puzzle_logits(shuffled)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32)
        self.accuracy_tracker.update_state(hits)
        return tf.reduce_sum(pretext_cross_entropy(logits, labels)) / global_batch, {}
