"""A 3x3 grid of tiles per image, with gaps and jitter: the input of the patch pretext tasks.

Relative patch position (Doersch et al. 2015) and jigsaw puzzles (Noroozi & Favaro 2016)
both cut an image into a grid and ask a network about the arrangement of the pieces.
Both papers leave a gap between pieces and jitter each piece inside its cell, so that the
task cannot be solved by continuing lines or textures across a shared border (a "trivial
shortcut"); the jigsaw paper also normalizes each tile's mean and standard deviation on
its own, so that brightness does not give a tile's position away. Here a square image of
side S is centre-cropped to 3 * (S // 3) pixels, each cell of side c = S // 3 gives one
tile of side t = round(0.75 c) (the jigsaw paper cuts 64 of 75-pixel cells, its common
PyTorch port 64 of 85). Of the c - t spare pixels per cell and axis, half (at least 1) is
kept as a gap and the rest is jitter, so neighbouring tiles are always at least that gap apart (`tile_offsets`).
Offsets are drawn for the global batch (`augment.GlobalDraws`), so 1 and N replicas cut
the same tiles.
"""

import keras
import tensorflow as tf

from recipes.augment import GlobalDraws
from recipes.heads import at_input_shape

GRID = 3


def tile_geometry(side: int) -> tuple[int, int]:
    """(cell side, tile side) for square images of `side` pixels."""
    cell = side // GRID
    tile = max(1, round(0.75 * cell))
    if tile < 4:
        raise ValueError(f"Images of {side} px give {tile}-px tiles; the patch pretext tasks need at least 16 px.")
    return cell, tile


def tile_offsets(cell: int, tile: int) -> tuple[int, int]:
    """(lowest, highest) offset of a tile in its cell: a range of c - t - g + 1 values, g =
    max(1, (c - t) // 2), so two neighbouring tiles are at least g pixels apart (their gap is
    c - t + (next offset - this offset))."""
    spare = cell - tile
    gap = max(1, spare // 2)
    if spare < gap:
        raise ValueError(f"Cells of {cell} px leave no gap between {tile}-px tiles.")
    return gap // 2, spare - (gap - gap // 2)


def grid_tiles(images, seed, global_batch: int):
    """[B, S, S, C] images -> [B, 9, t, t, C] float32 tiles, row-major over the grid."""
    side = images.shape[1]
    if images.shape[2] != side:
        raise ValueError(f"Tiles need square images, got {images.shape[1]}x{images.shape[2]}; use --image_size.")
    cell, tile = tile_geometry(side)
    low, high = tile_offsets(cell, tile)
    local_batch = images.shape[0]
    draws = GlobalDraws(seed, global_batch, local_batch)
    x = tf.cast(images, tf.float32)
    margin = (side - GRID * cell) // 2
    boxes = []
    for row in range(GRID):
        for col in range(GRID):
            top = margin + row * cell + draws.integers(low, high + 1)
            left = margin + col * cell + draws.integers(low, high + 1)
            top, left = tf.cast(top, tf.float32), tf.cast(left, tf.float32)
            # corners of exact pixels: crop_and_resize samples t points from first to last, inclusive
            boxes.append(tf.stack([top, left, top + tile - 1, left + tile - 1], axis=1) / (side - 1))
    boxes = tf.reshape(tf.stack(boxes, axis=1), [-1, 4])  # image-major: [B * 9, 4]
    indices = tf.repeat(tf.range(local_batch), GRID * GRID)
    tiles = tf.image.crop_and_resize(x, boxes, indices, (tile, tile), method="nearest")
    return tf.reshape(tiles, [local_batch, GRID * GRID, tile, tile, images.shape[-1]])


def standardize_tiles(tiles, epsilon=1.0, per_channel=False):
    """Each tile (each of its channels if `per_channel`) to its own zero mean and unit standard
    deviation, mapped back to the [0, 255] range encoders take (mean 127.5, std 64): the jigsaw
    paper's per-tile normalization."""
    mean, variance = tf.nn.moments(tiles, axes=[-3, -2] if per_channel else [-3, -2, -1], keepdims=True)
    return (tiles - mean) / tf.sqrt(variance + epsilon) * 64.0 + 127.5


def tile_encoder(encoder, task: str):
    """The encoder (same layers and weights) on single tiles of its square images."""
    height, width, channels = encoder.input_shape[1:]
    if height != width:
        raise ValueError(f"{task} cuts a square grid; the encoder takes {height}x{width} images.")
    _, tile = tile_geometry(height)
    return at_input_shape(encoder, (tile, tile, channels))


class TileSetClassifier(keras.layers.Layer):
    """The tile towers of context prediction and jigsaw: each tile of a set goes alone through
    the encoder and a per-tile layer (fc6); the set's concatenated outputs are classified
    (fc7, fc8). No tile sees another before fc7: the jigsaw paper's "context-free network"."""

    def __init__(self, tile_encoder, tiles_per_set: int, tile_dim: int, hidden_dim: int, num_classes: int,
                 **kwargs):
        super().__init__(**kwargs)
        self.tile_encoder, self.tiles_per_set, self.tile_dim = tile_encoder, int(tiles_per_set), int(tile_dim)
        self.fc6 = keras.Sequential([keras.layers.Dense(self.tile_dim, use_bias=False),
                                     keras.layers.BatchNormalization(), keras.layers.ReLU()], name="fc6")
        self.fc6.build((None, tile_encoder.output_shape[-1]))
        self.fc7_fc8 = keras.Sequential([keras.layers.Dense(int(hidden_dim), use_bias=False),
                                         keras.layers.BatchNormalization(), keras.layers.ReLU(),
                                         keras.layers.Dense(int(num_classes))], name="fc7_fc8")
        self.fc7_fc8.build((None, self.tiles_per_set * self.tile_dim))

    def call(self, tile_sets, training=False):
        """[B, n, t, t, C] -> [B, num_classes] logits."""
        rows = tf.shape(tile_sets)[0]
        per_tile = self.fc6(self.tile_encoder(tf.reshape(tile_sets, [-1, *tile_sets.shape[2:]]), training=training),
                            training=training)
        return self.fc7_fc8(tf.reshape(per_tile, [rows, self.tiles_per_set * self.tile_dim]), training=training)
