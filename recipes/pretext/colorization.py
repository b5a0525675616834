"""Colorful Image Colorization: learn features by predicting an image's colours from its lightness.

Zhang, Isola, Efros 2016, "Colorful Image Colorization" (ECCV).

The image is converted to CIE Lab (sRGB, D65 white; `rgb_to_lab`). The network sees the
lightness L only and predicts, per pixel, a distribution over the quantized ab colour
plane (sec. 2.1): colour is multimodal (a car can be red or blue), and a regression of
ab to the mean would predict desaturated greys, so the paper poses it as classification.

* Bins: ab quantized on a grid of size 10, keeping the in-gamut cells. The paper's 313
  bins (its `pts_in_hull.npy`) are not available here; `ab_bins` derives the in-gamut
  cells as those that at least one of the 2^24 8-bit sRGB colours falls in (an exact
  enumeration, about 0.5 s, cached): 261 bins for grid size 10, with a in [-90, 100]
  and b in [-110, 90]. Every bin is a cell some sRGB pixel can fall in, and every pixel's
  nearest bin is its own cell.
* Targets (sec. 2.1): the soft-encoded ground truth (`soft_encode`), the 5 nearest bins
  of the true ab weighted by a Gaussian of sigma 5 on the distance.
* Loss (eqs. 2-4): per-pixel multinomial cross-entropy, each pixel weighted by the class
  rebalancing weight of its nearest bin, w proportional to ((1 - lambda) p~ + lambda / Q)^-1
  with p~ the empirical bin distribution smoothed by a Gaussian of sigma 5, lambda = 0.5,
  normalized so E_p~[w] = 1 (`rebalancing_weights`); lambda = 1 turns rebalancing off
  (w = 1). The paper sums over pixels; the per-image loss here is the mean over the
  output pixels (a constant factor), summed over images and divided by the global batch.
* Output: at a quarter of the input resolution (the paper's 56 x 56 for 224 x 224; 8 x 8
  for 32 x 32 here), against the true ab subsampled every 4th pixel, as the authors'
  training network does (its `data_ab_ss`, a fixed stride-4 1 x 1 convolution).
* Inference: the annealed mean of the predicted distribution, T = 0.38 (eq. 5,
  `annealed_mean`, `Colorization.predict_ab`); not used in training.

The empirical distribution p of the paper is that of all ImageNet training pixels,
computed before training. Here it is estimated during training: a running mean of the
nearest-bin histogram of the target pixels of every step until `prior_steps` (the
histogram of the whole global batch, summed over replicas, so every replica holds the
same p and the same weights), frozen from then on and kept, with the number of pixels
it averages, in non-trainable variables that checkpoints restore. Step t's loss uses the
estimate that includes step t's batch (so step 0 already has one).

The encoder: the zoo publishes an encoder for the dataset's image shape, RGB for colour
datasets, so it keeps taking 3-channel images: it is fed the desaturated image
(`desaturate`), the sRGB grey with the same L in all three channels (Lab (L, 0, 0)), which
carries exactly the lightness the paper's network gets and no colour. The encoder ends
in a pooled vector, not a per-pixel map as the paper's fully convolutional VGG, so the
prediction head (`decoder_dim`) decodes it to the coarse map: dense -> reshape to a grid
of at most 8 x 8 -> (2x bilinear upsampling + 3 x 3 conv) until the output size -> 3 x 3
conv -> 1 x 1 conv to Q logits, with BN-ReLU after each hidden layer. Colorization
needs colour images: a 1-channel dataset (Fashion-MNIST) raises a ValueError. Features
learned on grey inputs are evaluated, as every recipe's, on the dataset's own colour
images: the encoder never sees colour in training.

Grey images: the authors' released training network also drops images without colour from
the loss (its non-grey mask, not described in the paper): an image counts only if one of its
target pixels has |a| or |b| above 5 (`grey_threshold`; `colour_images`). A grey photo has
no colour to teach, and its all-grey targets would only pull predictions toward grey. Its
pixels still count in the bin distribution, and the loss is still divided by the whole
global batch, as the released network's mask multiplies the per-image loss.

Augmentation: the random translation (12.5% of the side, reflected) and flip of
`recipes.semi.randaugment.weak_view`, as RotNet.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

from recipes import distribute
from recipes.base import Recipe, register
from recipes.losses import colorization_loss
from recipes.semi.randaugment import weak_view

# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, and the D65 reference white (2-degree observer).
SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_DELTA = 6.0 / 29.0  # CIE's f(t) switches from the cube root to a line at t = delta^3


# ---- colour space -------------------------------------------------------------------------
def srgb_to_linear(c):
    """sRGB-encoded values in [0, 1] -> linear light (the sRGB "gamma")."""
    return tf.where(c <= 0.04045, c / 12.92, tf.pow((tf.maximum(c, 0.04045) + 0.055) / 1.055, 2.4))


def linear_to_srgb(c):
    """Linear light in [0, 1] -> sRGB-encoded values, the inverse of `srgb_to_linear`."""
    return tf.where(c <= 0.0031308, 12.92 * c, 1.055 * tf.pow(tf.maximum(c, 0.0031308), 1.0 / 2.4) - 0.055)


def rgb_to_lab(images):
    """sRGB images [..., 3] in [0, 255] -> CIE Lab [..., 3] (L in [0, 100]; D65 white).

    The standard formulas: undo the sRGB gamma, linear RGB -> XYZ, divide by the white
    (X_n, Y_n, Z_n), f(t) = t^(1/3) above (6/29)^3 and t / (3 (6/29)^2) + 4/29 below;
    L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z)).
    """
    images = tf.convert_to_tensor(images)
    dtype = images.dtype if images.dtype.is_floating else tf.float32
    linear = srgb_to_linear(tf.cast(images, dtype) / 255.0)
    xyz = tf.tensordot(linear, tf.constant(SRGB_TO_XYZ.T / D65_WHITE, dtype), axes=1)  # X/X_n, Y/Y_n, Z/Z_n
    f = tf.where(xyz > _DELTA ** 3, tf.pow(tf.maximum(xyz, _DELTA ** 3), 1.0 / 3.0),
                 xyz / (3.0 * _DELTA ** 2) + 4.0 / 29.0)
    fx, fy, fz = tf.unstack(f, axis=-1)
    return tf.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def desaturate(images):
    """sRGB images [..., 3] in [0, 255] -> the grey image of the same lightness, [..., 3] in [0, 255].

    Each pixel becomes (g, g, g) with the luminance Y of the original (so its Lab is (L, 0, 0)):
    what the encoder sees, the paper's L input in the RGB form the published encoder takes.
    """
    images = tf.convert_to_tensor(images)
    dtype = images.dtype if images.dtype.is_floating else tf.float32
    luminance = tf.tensordot(srgb_to_linear(tf.cast(images, dtype) / 255.0),
                             tf.constant(SRGB_TO_XYZ[1], dtype), axes=1)
    grey = 255.0 * linear_to_srgb(tf.clip_by_value(luminance, 0.0, 1.0))
    return tf.repeat(grey[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=None)
def ab_bins(grid_size: float = 10.0) -> np.ndarray:
    """The in-gamut ab bins [Q, 2] (float64, centres at multiples of `grid_size`, sorted by a then b).

    A cell (centre c, side `grid_size`) is kept when at least one of the 2^24 8-bit sRGB
    colours has its ab in it, i.e. round(ab / grid_size) = c / grid_size. Enumerated
    exactly, one red level at a time, with per-channel lookup tables (XYZ is linear in
    the linearized channels). 261 bins for grid size 10 (the paper: 313, see the module).
    """
    c = np.arange(256) / 255.0
    levels = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # linear light of each 8-bit level
    # contribution of each channel level to X/X_n, Y/Y_n, Z/Z_n: [256 levels, 3 channels, 3]
    contribution = levels[:, None, None] * (SRGB_TO_XYZ.T / D65_WHITE)[None]
    green_blue = (contribution[:, None, 1] + contribution[None, :, 2]).reshape(-1, 3)
    cells = []
    for red in range(256):
        xyz = green_blue + contribution[red, 0]
        f = np.where(xyz > _DELTA ** 3, np.cbrt(xyz), xyz / (3.0 * _DELTA ** 2) + 4.0 / 29.0)
        a = np.rint(500.0 * (f[:, 0] - f[:, 1]) / grid_size).astype(np.int64)
        b = np.rint(200.0 * (f[:, 1] - f[:, 2]) / grid_size).astype(np.int64)
        cells.append(np.unique((a << 32) + b))  # one int64 per cell: a in the high bits, b in the low
    codes = np.unique(np.concatenate(cells))
    a, b = (codes + (1 << 31)) >> 32, ((codes + (1 << 31)) & ((1 << 32) - 1)) - (1 << 31)
    return np.stack([a, b], axis=1).astype(np.float64) * grid_size


# ---- targets, weights, loss, inference ------------------------------------------------------
def _squared_distances(ab, bins):
    """[..., 2] x [Q, 2] -> [..., Q] squared Euclidean distances in the ab plane."""
    return tf.reduce_sum(tf.square(ab[..., None, :] - tf.cast(bins, ab.dtype)), axis=-1)


def soft_encode(ab, bins, num_neighbors: int = 5, sigma: float = 5.0):
    """Soft-encoding of true colours (sec. 2.1): the `num_neighbors` nearest bins, Gaussian weights.

    Args:
      ab: [..., 2] true ab values.
      bins: [Q, 2] bin centres.
    Returns:
      (indices [..., k] int32, nearest bin first; weights [..., k] summing to 1), with
      weight_j proportional to exp(-d_j^2 / (2 sigma^2)). The dense target Z [..., Q] is
      these weights scattered to the indices (`dense_soft_encoding`).
    """
    ab = tf.convert_to_tensor(ab)
    negative, indices = tf.math.top_k(-_squared_distances(ab, bins), k=num_neighbors)
    weights = tf.nn.softmax(negative / (2.0 * sigma ** 2), axis=-1)  # = exp(-d^2/2s^2) / sum
    return indices, weights


def colour_images(ab, threshold: float = 5.0):
    """1.0 for an image with colour, 0.0 for a grey one: [B, H, W, 2] ab -> [B].

    An image has colour when at least one pixel has |a| or |b| above `threshold` (the
    released training code's non-grey mask, on the subsampled target pixels)."""
    coloured = tf.reduce_any(tf.abs(ab) > threshold, axis=[1, 2, 3])
    return tf.cast(coloured, ab.dtype)


def dense_soft_encoding(indices, weights, num_bins: int):
    """The sparse targets of `soft_encode` as the dense distribution Z [..., Q]."""
    return tf.reduce_sum(tf.one_hot(indices, num_bins, dtype=weights.dtype) * weights[..., None], axis=-2)


def rebalancing_weights(prior, bins, rebalance_lambda: float = 0.5, sigma: float = 5.0):
    """Class-rebalancing weights w [Q] from an empirical bin distribution (eqs. 3-4).

    p~ = `prior` smoothed by a Gaussian of `sigma` over the bins' ab positions
    (p~_q proportional to sum_r exp(-|c_q - c_r|^2 / (2 sigma^2)) p_r, renormalized over the
    bins), w proportional to ((1 - lambda) p~ + lambda / Q)^-1, scaled so that sum_q p~_q w_q = 1.
    """
    prior = tf.convert_to_tensor(prior)
    bins = tf.cast(bins, prior.dtype)
    kernel = tf.exp(-_squared_distances(bins, bins) / (2.0 * sigma ** 2))
    smoothed = tf.linalg.matvec(kernel, prior)
    smoothed = smoothed / tf.reduce_sum(smoothed)
    num_bins = tf.cast(tf.shape(prior)[0], prior.dtype)
    weights = 1.0 / ((1.0 - rebalance_lambda) * smoothed + rebalance_lambda / num_bins)
    return weights / tf.reduce_sum(smoothed * weights)


def annealed_mean(logits, bins, temperature: float = 0.38):
    """The paper's prediction (eq. 5): ab = sum_q f_T(z)_q c_q, f_T(z) = exp(log z / T) / sum exp(log z / T).

    With z = softmax(logits), f_T(z) = softmax(logits / T). T = 1 is the mean (desaturated),
    T -> 0 the mode (vivid but patchy); the paper's T = 0.38 is in between.

    Args:
      logits: [..., Q]. bins: [Q, 2].
    Returns:
      [..., 2] predicted ab.
    """
    logits = tf.convert_to_tensor(logits)
    return tf.tensordot(tf.nn.softmax(logits / temperature, axis=-1), tf.cast(bins, logits.dtype), axes=1)


# ---- the recipe -----------------------------------------------------------------------------
def colour_decoder(grid, output_shape, num_bins, dim, name="colour_decoder"):
    """Pooled features -> [grid_h * 2^u, grid_w * 2^u, num_bins] logits (see the module)."""
    (grid_h, grid_w), out_h = grid, output_shape[0]
    bn = dict(momentum=0.9, epsilon=1e-5)
    blocks = [keras.layers.Dense(grid_h * grid_w * dim, use_bias=False, name=f"{name}_dense"),
              keras.layers.Reshape((grid_h, grid_w, dim), name=f"{name}_grid"),
              keras.layers.BatchNormalization(**bn, name=f"{name}_bn0"), keras.layers.ReLU(name=f"{name}_relu0")]
    upsamplings = 0
    while grid_h < out_h:
        upsamplings += 1
        grid_h, grid_w = 2 * grid_h, 2 * grid_w
        blocks += [keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_up{upsamplings}"),
                   keras.layers.Conv2D(dim, 3, padding="same", use_bias=False, name=f"{name}_upconv{upsamplings}"),
                   keras.layers.BatchNormalization(**bn, name=f"{name}_upbn{upsamplings}"),
                   keras.layers.ReLU(name=f"{name}_uprelu{upsamplings}")]
    blocks += [keras.layers.Conv2D(dim, 3, padding="same", use_bias=False, name=f"{name}_conv"),
               keras.layers.BatchNormalization(**bn, name=f"{name}_bn"), keras.layers.ReLU(name=f"{name}_relu"),
               keras.layers.Conv2D(num_bins, 1, name=f"{name}_logits")]
    return keras.Sequential(blocks, name=name)


def _start_grid(height, width, largest=8):
    """The decoder's first grid: the output size halved while both sides stay even and one exceeds `largest`."""
    while max(height, width) > largest and height % 2 == 0 and width % 2 == 0:
        height, width = height // 2, width // 2
    return height, width


@register("colorization")
class Colorization(Recipe):
    """Colorization as classification of quantized ab colours, with class rebalancing.

    Args:
      encoder: backbone to pretrain; must take 3-channel (colour) images.
      decoder_dim: channels of the prediction head's hidden layers (64).
      target_stride: output (and target) resolution is the input's divided by this (4, the paper's).
      grid_size: side of the ab quantization cells (10).
      num_neighbors: bins of the soft-encoded targets (5).
      sigma: Gaussian of the soft encoding, in ab units (5).
      prior_sigma: Gaussian smoothing the empirical bin distribution (5).
      rebalance_lambda: weight of the uniform distribution in the rebalancing (0.5; 1 = no rebalancing).
      prior_steps: steps whose target pixels estimate the empirical distribution (1000); then frozen.
      temperature: T of the annealed mean, used by `predict_ab` only (0.38).
      translate: largest random shift, fraction of the side (0.125).
      grey_threshold: an image counts in the loss only if a target pixel's |a| or |b| exceeds
        it (5, the released code's non-grey mask); None counts every image.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      seed: augmentation seed.
    """

    # Only datasets of colour (3-channel) images can train it; benchmark settings may key off this.
    needs_colour = True

    def __init__(self, encoder, decoder_dim=64, target_stride=4, grid_size=10.0, num_neighbors=5, sigma=5.0,
                 prior_sigma=5.0, rebalance_lambda=0.5, prior_steps=1000, temperature=0.38, translate=0.125,
                 grey_threshold=5.0, bn_splits=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        height, width, channels = encoder.input_shape[1:]
        if channels != 3:
            raise ValueError(f"Colorization needs colour images: it predicts the colours of a grey version of "
                             f"each image, and the encoder takes {channels}-channel images (Fashion-MNIST is grey). "
                             f"Train on an RGB dataset (synthetic_shapes, or a folder with --channels=3).")
        self.decoder_dim, self.target_stride = int(decoder_dim), int(target_stride)
        if height % self.target_stride or width % self.target_stride:
            raise ValueError(f"target_stride={self.target_stride} must divide the image size {height}x{width}.")
        self.grid_size, self.num_neighbors = float(grid_size), int(num_neighbors)
        self.sigma, self.prior_sigma = float(sigma), float(prior_sigma)
        self.rebalance_lambda = float(rebalance_lambda)
        if not 0.0 < self.rebalance_lambda <= 1.0:
            raise ValueError(f"rebalance_lambda must be in (0, 1], got {rebalance_lambda}.")
        self.prior_steps = int(prior_steps)
        if self.prior_steps < 1:
            raise ValueError(f"prior_steps must be >= 1 (the rebalancing needs an estimate), got {prior_steps}.")
        self.temperature, self.translate = float(temperature), float(translate)
        self.grey_threshold = None if grey_threshold is None else float(grey_threshold)
        self.bn_splits = None if bn_splits is None else int(bn_splits)

        self.bins = ab_bins(self.grid_size)
        self.num_bins = len(self.bins)
        self.output_size = (height // self.target_stride, width // self.target_stride)
        self.decoder = colour_decoder(_start_grid(*self.output_size), self.output_size, self.num_bins,
                                      self.decoder_dim)
        self.decoder.build((None, encoder.output_shape[-1]))
        # The running empirical distribution of the targets' nearest bins, and how many pixels it averages.
        self.prior = self.add_weight(shape=(self.num_bins,), initializer="zeros", trainable=False, name="prior")
        self.prior_pixels = self.add_weight(shape=(), initializer="zeros", trainable=False, name="prior_pixels")
        self.accuracy_tracker = keras.metrics.Mean(name="bin_acc")

    def get_config(self):
        return {**super().get_config(), "decoder_dim": self.decoder_dim, "target_stride": self.target_stride,
                "grid_size": self.grid_size, "num_neighbors": self.num_neighbors, "sigma": self.sigma,
                "prior_sigma": self.prior_sigma, "rebalance_lambda": self.rebalance_lambda,
                "prior_steps": self.prior_steps, "temperature": self.temperature, "translate": self.translate,
                "grey_threshold": self.grey_threshold, "bn_splits": self.bn_splits}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def colour_logits(self, images, training=True):
        """Bin logits [B, H/stride, W/stride, Q] of RGB images [B, H, W, 3], from their grey version."""
        return self.encode_in_groups(
            lambda x, training: self.decoder(self.encoder(x, training=training), training=training),
            desaturate(images), self.bn_splits or self.num_replicas, training=training)

    def predict_ab(self, images):
        """The paper's output: annealed-mean ab [B, H/stride, W/stride, 2] of RGB images (seen desaturated)."""
        logits = self.decoder(self.encoder(desaturate(images), training=False), training=False)
        return annealed_mean(logits, self.bins, self.temperature)

    def target_ab(self, views):
        """The true ab [B, h, w, 2] of every `target_stride`-th pixel."""
        return rgb_to_lab(views)[:, ::self.target_stride, ::self.target_stride, 1:]

    def updated_prior(self, nearest):
        """(distribution, pixels) after counting the global batch's nearest bins, while counting lasts."""
        dtype = self.prior.dtype
        local = tf.math.unsorted_segment_sum(tf.ones([tf.size(nearest)], dtype), tf.reshape(nearest, [-1]),
                                             self.num_bins)
        counts = distribute.all_reduce_sum(local)  # the global batch's histogram, on every replica
        pixels = self.prior_pixels.value + tf.reduce_sum(counts)
        mixed = self.prior.value + (counts - tf.reduce_sum(counts) * self.prior.value) / pixels
        counting = self.optimizer.iterations < self.prior_steps
        return (tf.where(counting, mixed, self.prior.value), tf.where(counting, pixels, self.prior_pixels.value))

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        views = weak_view(images, self.step_seed(1), global_batch, self.translate)
        ab = self.target_ab(views)
        indices, weights = soft_encode(ab, self.bins, self.num_neighbors, self.sigma)
        nearest = indices[..., 0]
        prior, pixels = self.updated_prior(nearest)
        class_weights = rebalancing_weights(prior, self.bins, self.rebalance_lambda, self.prior_sigma)
        logits = tf.cast(self.colour_logits(views), self.variable_dtype)
        losses = colorization_loss(logits, indices, weights, tf.gather(class_weights, nearest))
        if self.grey_threshold is not None:
            losses *= tf.cast(colour_images(ab, self.grey_threshold), losses.dtype)
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), nearest)
        self.accuracy_tracker.update_state(tf.reduce_mean(tf.cast(hits, tf.float32), axis=[1, 2]))
        return tf.reduce_sum(losses) / global_batch, {"prior": prior, "prior_pixels": pixels}

    def after_update(self, data, state):
        distribute.assign_synced([self.prior, self.prior_pixels], [state["prior"], state["prior_pixels"]])
