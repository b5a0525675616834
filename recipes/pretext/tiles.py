"""A 3x3 grid of tiles per image, with gaps and jitter: the input of the patch pretext tasks.

Relative patch position (Doersch et al. 2015) and jigsaw puzzles (Noroozi & Favaro 2016)
both cut an image into a grid and ask a network about the arrangement of the pieces.
Both papers leave a gap between pieces and jitter each piece inside its cell, so that the
task cannot be solved by continuing lines or textures across a shared border (a "trivial
shortcut"); the jigsaw paper also normalizes each tile's mean and standard deviation on
its own, so that brightness does not give a tile's position away. Here a square image of
side S is centre-cropped to 3 * (S // 3) pixels, each cell of side c = S // 3 gives one
tile of side round(0.75 c) (64 of the jigsaw paper's 85-pixel cells) at a random offset
in the cell; offsets are drawn for the global batch (`augment.GlobalDraws`), so 1 and N
replicas cut the same tiles.
"""

import tensorflow as tf

from recipes.augment import GlobalDraws

GRID = 3


def tile_geometry(side: int) -> tuple[int, int]:
    """(cell side, tile side) for square images of `side` pixels."""
    cell = side // GRID
    tile = max(1, round(0.75 * cell))
    if tile < 4:
        raise ValueError(f"Images of {side} px give {tile}-px tiles; the patch pretext tasks need at least 16 px.")
    return cell, tile


def grid_tiles(images, seed, global_batch: int):
    """[B, S, S, C] images -> [B, 9, t, t, C] float32 tiles, row-major over the grid."""
    side = images.shape[1]
    if images.shape[2] != side:
        raise ValueError(f"Tiles need square images, got {images.shape[1]}x{images.shape[2]}; use --image_size.")
    cell, tile = tile_geometry(side)
    local_batch = images.shape[0]
    draws = GlobalDraws(seed, global_batch, local_batch)
    x = tf.cast(images, tf.float32)
    margin = (side - GRID * cell) // 2
    boxes = []
    for row in range(GRID):
        for col in range(GRID):
            top = margin + row * cell + draws.integers(0, cell - tile + 1)
            left = margin + col * cell + draws.integers(0, cell - tile + 1)
            top, left = tf.cast(top, tf.float32), tf.cast(left, tf.float32)
            # corners of exact pixels: crop_and_resize samples t points from first to last, inclusive
            boxes.append(tf.stack([top, left, top + tile - 1, left + tile - 1], axis=1) / (side - 1))
    boxes = tf.reshape(tf.stack(boxes, axis=1), [-1, 4])  # image-major: [B * 9, 4]
    indices = tf.repeat(tf.range(local_batch), GRID * GRID)
    tiles = tf.image.crop_and_resize(x, boxes, indices, (tile, tile), method="nearest")
    return tf.reshape(tiles, [local_batch, GRID * GRID, tile, tile, images.shape[-1]])


def standardize_tiles(tiles, epsilon=1.0):
    """Each tile to its own zero mean and unit standard deviation, mapped back to the [0, 255]
    range encoders take (mean 127.5, std 64): the jigsaw paper's per-tile normalization."""
    mean, variance = tf.nn.moments(tiles, axes=[-3, -2, -1], keepdims=True)
    return (tiles - mean) / tf.sqrt(variance + epsilon) * 64.0 + 127.5
