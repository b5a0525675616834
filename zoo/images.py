"""How an image of any size becomes an encoder's input: scaled to cover it, centre-cropped.

One definition for both sides of a model: `recipes.image_folder` prepares training and
test images with it, and the SavedModel's `embed_bytes` and `classify` signatures apply
it to the images they are sent, so a served photo reaches the encoder as the training
photos did (scaling without keeping the aspect ratio would stretch it instead).
"""

import tensorflow as tf


def decode_image(data, channels: int):
    """Encoded bytes (PNG, JPEG, GIF, BMP, WebP) -> uint8 [h, w, channels], the first frame of
    an animation. TF's GIF and BMP decoders refuse one channel, so a grey model's GIF or BMP is
    decoded in RGB and converted (PNG and JPEG keep their decoders' own grey conversion)."""
    if channels != 1:
        return tf.io.decode_image(data, channels=channels, expand_animations=False)
    magic = tf.strings.substr(data, 0, 2)
    via_rgb = tf.logical_or(tf.equal(magic, "GI"), tf.equal(magic, "BM"))
    image = tf.cond(via_rgb,
                    lambda: tf.image.rgb_to_grayscale(tf.io.decode_image(data, channels=3, expand_animations=False)),
                    lambda: tf.io.decode_image(data, channels=1, expand_animations=False))
    image.set_shape([None, None, 1])
    return image


def fit_image(image, height: int, width: int):
    """[h, w, c] image -> float32 [height, width, c] in the same value range.

    An image of exactly that size is returned unchanged (pixels exact). Any other is scaled,
    keeping its aspect ratio and antialiased when it shrinks, until it covers height x width,
    and its centre is cut out. Plain TF ops: works eagerly and inside a SavedModel's graph.
    """
    image = tf.cast(image, tf.float32)
    size = tf.shape(image)[:2]

    def cover_and_crop():
        scale = tf.maximum(height / tf.cast(size[0], tf.float32), width / tf.cast(size[1], tf.float32))
        new_height = tf.maximum(height, tf.cast(tf.round(tf.cast(size[0], tf.float32) * scale), tf.int32))
        new_width = tf.maximum(width, tf.cast(tf.round(tf.cast(size[1], tf.float32) * scale), tf.int32))
        scaled = tf.image.resize(image, tf.stack([new_height, new_width]), antialias=True)
        top, left = (new_height - height) // 2, (new_width - width) // 2
        return scaled[top:top + height, left:left + width]

    same_size = tf.reduce_all(tf.equal(size, [height, width]))
    fitted = tf.cond(same_size, lambda: image, cover_and_crop)
    return tf.ensure_shape(fitted, [height, width, image.shape[-1]])
