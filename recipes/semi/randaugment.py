"""Weak and strong views for semi-supervised learning: flip-and-translate, RandAugment, Cutout.

* Weak view (FixMatch, Sohn et al. 2020, sec. 2.3): horizontal flip with p=0.5 and a
  translation of up to 12.5% of the side in each direction, reflecting at the
  border (the reference code pads by reflection and crops).
* RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data
  augmentation with a reduced search space"): N operations drawn uniformly per image
  from the list below, each at magnitude M. With `magnitude=None` every operation
  draws its own magnitude uniformly at random, FixMatch's "RA" variant (Sohn et al.
  2020, appendix, table 12); Noisy Student (Xie et al. 2020) uses N=2 and a fixed M.
* Cutout (DeVries & Taylor 2017): a grey square of side drawn uniformly up to half the
  image (the paper's table 12, as TorchSSL), which FixMatch applies after RandAugment in
  every strong view. The released FixMatch code cuts a fixed half-side square instead
  (about 2.8x the area on average, border clipping included): a stronger strong view
  than ours.

The 14 operations and their ranges at full strength s=1 (sign of the signed ones is
random): identity, auto-contrast, equalize, brightness / colour / contrast /
sharpness factor 1 +- 0.9 s (PIL's ImageEnhance semantics; the range of FixMatch's
CTAugment code, where table 12 says 0.05-0.95), posterize to 8 - 4 s bits (table 12),
solarize above 256 (1 - s), rotate +-30 s degrees, shear x / y +-0.3 s, translate x / y
+-0.3 s of the side. Both drawn operations are always applied (as TorchSSL; the
released RandAugment pool applies each with p=0.5). Geometric operations fill with
grey (128), as the reference implementations do.

All operations are batched TF ops with per-image parameters, and their randomness
is drawn for the *global* batch and sliced to this replica's rows (as in
`recipes/augment.py`), so a view is the same on 1 or N replicas. Images are float32
in [0, 255]; operations that PIL defines on integers (posterize, solarize,
equalize) round first. Geometric operations interpolate bilinearly (PIL's default
for these is nearest): a small, deliberate difference.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from recipes.augment import GlobalDraws, gray

GREY = 128.0

OPERATIONS = ("identity", "auto_contrast", "equalize", "brightness", "color", "contrast", "sharpness",
              "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclasses.dataclass(frozen=True)
class StrongPolicy:
    """Parameters of the strong view: RandAugment(num_ops, magnitude) then Cutout.

    magnitude: strength in [0, 1] shared by all operations, or None to draw it
      uniformly per image and operation (FixMatch's RA).
    cutout: largest Cutout side as a fraction of the image side (0 disables).
    """

    num_ops: int = 2
    magnitude: float | None = None
    cutout: float = 0.5

    def to_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "StrongPolicy":
        return cls(**config)


def _b(per_image):
    """[B] -> [B, 1, 1, 1], to broadcast a per-image value over pixels."""
    return tf.reshape(per_image, [-1, 1, 1, 1])


def _blend(degenerate, x, factor):
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 255]."""
    return tf.clip_by_value(degenerate + _b(factor) * (x - degenerate), 0.0, 255.0)


# ---- colour operations: f(x [B,H,W,C] float in [0,255], strength [B], sign [B]) ----------
def auto_contrast(x, strength=None, sign=None):
    """Stretches each channel of each image to span [0, 255]."""
    low = tf.reduce_min(x, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-6), 1.0)
    offset = tf.where(high > low, low, 0.0)
    return tf.clip_by_value((x - offset) * scale, 0.0, 255.0)


def equalize(x, strength=None, sign=None):
    """Histogram equalization per image and channel, with PIL's look-up table.

    PIL (ImageOps.equalize): step = (pixels - count of the brightest value) // 255;
    lut[v] = (step // 2 + pixels below v) // step; no change when step is 0.
    """
    batch, height, width, channels = x.shape
    values = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.int32)
    rows = tf.reshape(tf.transpose(values, [0, 3, 1, 2]), [-1, height * width])  # [B*C, HW]
    histogram = tf.math.bincount(rows, minlength=256, maxlength=256, axis=-1)  # [B*C, 256]
    brightest = tf.gather(histogram, tf.reduce_max(rows, axis=1), batch_dims=1)
    step = (height * width - brightest) // 255
    below = tf.cumsum(histogram, axis=1, exclusive=True)
    lut = tf.minimum((step[:, None] // 2 + below) // tf.maximum(step[:, None], 1), 255)
    equalized = tf.gather(lut, rows, batch_dims=1)
    equalized = tf.where(step[:, None] > 0, equalized, rows)
    equalized = tf.transpose(tf.reshape(equalized, [-1, channels, height, width]), [0, 2, 3, 1])
    return tf.cast(equalized, tf.float32)


def brightness(x, strength, sign):
    return _blend(tf.zeros_like(x), x, 1.0 + 0.9 * strength * sign)


def color(x, strength, sign):
    return _blend(gray(x), x, 1.0 + 0.9 * strength * sign)


def contrast(x, strength, sign):
    mean = tf.reduce_mean(gray(x), axis=[1, 2, 3], keepdims=True)
    return _blend(mean, x, 1.0 + 0.9 * strength * sign)


def sharpness(x, strength, sign):
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5, /13) on the interior."""
    channels = x.shape[-1]
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")
    degenerate = tf.pad(smooth, [[0, 0], [1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.ones_like(smooth[:1, ..., :1]), [[0, 0], [1, 1], [1, 1], [0, 0]]) < 0.5
    degenerate = tf.where(border, x, tf.round(degenerate))
    return _blend(degenerate, x, 1.0 + 0.9 * strength * sign)


def posterize(x, strength, sign=None):
    """Keeps the top 8 - round(4 s) bits of every value."""
    shift = tf.round(4.0 * strength)
    quantum = _b(tf.pow(2.0, shift))
    return tf.floor(tf.round(x) / quantum) * quantum


def solarize(x, strength, sign=None):
    """Inverts values at or above 256 (1 - s)."""
    threshold = _b(256.0 * (1.0 - strength))
    return tf.where(tf.round(x) >= threshold, 255.0 - tf.round(x), x)


_COLOR_OPS = {"identity": lambda x, s, g: x, "auto_contrast": auto_contrast, "equalize": equalize,
              "brightness": brightness, "color": color, "contrast": contrast, "sharpness": sharpness,
              "posterize": posterize, "solarize": solarize}


# ---- geometric operations as per-image affine maps (output pixel -> input pixel) -------
def _affine(name, strength, sign, height, width):
    """[B, 8] projective transforms for `name`, in ImageProjectiveTransform's convention."""
    ones, zeros = tf.ones_like(strength), tf.zeros_like(strength)
    signed = strength * sign
    if name == "rotate":
        angle = signed * 30.0 * math.pi / 180.0
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        cos, sin = tf.cos(angle), tf.sin(angle)
        a2 = cx - cos * cx + sin * cy
        b2 = cy - sin * cx - cos * cy
        return tf.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1)
    if name == "shear_x":
        return tf.stack([ones, 0.3 * signed, zeros, zeros, ones, zeros, zeros, zeros], axis=1)
    if name == "shear_y":
        return tf.stack([ones, zeros, zeros, 0.3 * signed, ones, zeros, zeros, zeros], axis=1)
    if name == "translate_x":
        return tf.stack([ones, zeros, 0.3 * signed * width, zeros, ones, zeros, zeros, zeros], axis=1)
    if name == "translate_y":
        return tf.stack([ones, zeros, zeros, zeros, ones, 0.3 * signed * height, zeros, zeros], axis=1)
    raise ValueError(f"Not a geometric operation: {name!r}.")


def _transform(x, transforms, fill_mode="CONSTANT", fill_value=GREY, interpolation="BILINEAR"):
    height, width = x.shape[1], x.shape[2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=tf.cast(transforms, tf.float32), output_shape=tf.constant([height, width]),
        fill_value=tf.constant(fill_value, tf.float32), interpolation=interpolation, fill_mode=fill_mode)


def randaugment_layer(x, choice, strength, sign):
    """Applies operation OPERATIONS[choice_b] at strength_b to each image b."""
    height, width = x.shape[1], x.shape[2]
    out = x
    for index, name in enumerate(OPERATIONS):
        if name in _COLOR_OPS:
            out = tf.where(_b(tf.equal(choice, index)), _COLOR_OPS[name](x, strength, sign), out)
    # All geometric choices in one warp: identity rows for images that drew a colour op.
    identity = tf.constant([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    transforms = tf.tile(identity, [tf.shape(x)[0], 1])
    for name in _GEOMETRIC:
        picked = tf.equal(choice, OPERATIONS.index(name))[:, None]
        transforms = tf.where(picked, _affine(name, strength, sign, height, width), transforms)
    geometric = tf.reduce_any(tf.equal(choice[:, None], [OPERATIONS.index(n) for n in _GEOMETRIC]), axis=1)
    return tf.where(_b(geometric), _transform(x, transforms), out)


def cutout(x, draws: GlobalDraws, max_fraction: float):
    """A grey square, side uniform in [0, max_fraction] of the image, centre anywhere."""
    height, width = x.shape[1], x.shape[2]
    side = draws.uniform(0.0, max_fraction) * min(height, width)
    cy = draws.uniform(0.0, float(height))
    cx = draws.uniform(0.0, float(width))
    ys = tf.range(height, dtype=tf.float32)[None, :, None, None] + 0.5
    xs = tf.range(width, dtype=tf.float32)[None, None, :, None] + 0.5
    inside = (tf.abs(ys - _b(cy)) < _b(side) / 2) & (tf.abs(xs - _b(cx)) < _b(side) / 2)
    return tf.where(inside, GREY, x)


def _start(images, seed, global_batch):
    local_batch = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
    return tf.cast(images, tf.float32), GlobalDraws(seed, global_batch, local_batch)


def weak_view(images, seed, global_batch: int, translate: float = 0.125, flip: bool = True):
    """Flip (p=0.5) + translate by up to `translate` of the side, reflecting at borders.

    Args:
      images: [B, H, W, C] uint8 or float in [0, 255], this replica's rows.
      seed: int32 [2] stateless seed, equal on all replicas for this step and view.
      global_batch: rows of the whole batch across replicas.

    Returns:
      [B, H, W, C] float32 in [0, 255].
    """
    x, draws = _start(images, seed, global_batch)
    height, width = x.shape[1], x.shape[2]
    dy = tf.cast(draws.integers(-int(translate * height), int(translate * height) + 1), tf.float32)
    dx = tf.cast(draws.integers(-int(translate * width), int(translate * width) + 1), tf.float32)
    mirror = draws.uniform() < 0.5 if flip else tf.zeros_like(dx, tf.bool)
    # x_in = (flip ? W-1-x : x) + dx ; y_in = y + dy
    a0 = tf.where(mirror, -1.0, 1.0)
    a2 = tf.where(mirror, width - 1.0, 0.0) + dx
    zeros, ones = tf.zeros_like(dx), tf.ones_like(dx)
    transforms = tf.stack([a0, zeros, a2, zeros, ones, dy, zeros, zeros], axis=1)
    return _transform(x, transforms, fill_mode="REFLECT", interpolation="NEAREST")


def strong_view(images, seed, global_batch: int, policy: StrongPolicy = StrongPolicy()):
    """RandAugment(num_ops, magnitude) followed by Cutout: FixMatch's strong view.

    Same arguments and result as `weak_view`.
    """
    x, draws = _start(images, seed, global_batch)
    for _ in range(policy.num_ops):
        choice = draws.integers(0, len(OPERATIONS))
        strength = draws.uniform() if policy.magnitude is None else tf.fill(tf.shape(choice), float(policy.magnitude))
        x = randaugment_layer(x, choice, strength, draws.sign())
    if policy.cutout > 0:
        x = cutout(x, draws, policy.cutout)
    return x
