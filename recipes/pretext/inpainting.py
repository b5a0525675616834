"""Context Encoders: learn features by painting in a region dropped from the image.

Pathak, Krähenbühl, Donahue, Darrell, Efros 2016, "Context Encoders: Feature Learning by
Inpainting" (CVPR).

A region of every image is dropped, i.e. filled with the mean value (zero after the
encoder's own normalization: `zoo.backbones.ImageNormalization`'s mean, 127.5 for encoders
without one), the encoder sees what is left (the context), and a decoder paints the
missing pixels back from the encoder's features. The loss is the L2 distance to the true
pixels on the dropped region only (`recipes.losses.reconstruction_loss`): to paint a missing sleeve the
encoder has to know what the garment is.

Masks (`mask`), the paper's section 3.3, each covering about a quarter of the image:
  * "center": the central square of half the side (the paper's 64 of 128 px), the same
    for every image. Best for inpainting, worst for features: the paper found the
    features then latch onto the fixed boundary and transfer worse than random masks.
  * "random_block" (default): `num_blocks` squares of a fixed side at uniform random
    positions, possibly overlapping, together covering at most `coverage` of the image
    (their sizes are chosen so that `num_blocks` disjoint ones cover exactly `coverage`).
    The paper reports random blocks and random regions give similarly general features,
    far better than the central region; the default is the block kind because the
    paper's random regions are PASCAL VOC segment shapes, which we do not have.
  * "random_region": the stand-in the authors' released code (train_random.lua) uses for
    arbitrary shapes: smooth blobs from coarse uniform noise (an 8 x 8 grid across the
    image, the code's 0.06 x 128 px) upsampled bilinearly and thresholded; here at the
    per-image quantile, so exactly `coverage` of each image is dropped.
Masks are drawn for the global batch from the step's seed (`recipes.augment.GlobalDraws`)
and each replica takes its rows, so 1 and N replicas drop the same pixels.

Overlap (the paper's implementation details, for the center region): the decoder predicts a
slightly larger square than the hole, overlapping the context by 7 px of 128, and the loss
weights that boundary band 10x (`overlap_weight`), which ties the painted region to its
surroundings (the released train.lua: a 4 px band, `overlapPred`, inside the 64 px patch).
Here `overlap` defaults to the paper's proportion of the side, round(7/128 * side): 1 px at
16 px, 2 px at 28 and 32 px. The band is used with mask="center" only, as in the paper
(the authors' random-region code leaves its 10x weighting off by default): around
scattered blocks or blobs a 10x band would outweigh the holes themselves.
The loss of an image is the weighted squared error averaged over the pixels of its
predicted region (hole plus band), the released code's MSE over the predicted patch.

Pixels: the decoder ends in tanh and predicts pixels scaled to [-1, 1] (x / 127.5 - 1),
as the released code (DCGAN's generator) does; the encoder takes its usual [0, 255].

Decoder: the paper's encoder ends in a 6 x 6 (AlexNet pool5) or 4 x 4 map joined to the
decoder by a channel-wise fully connected layer; the zoo's encoders end in a pooled
feature vector, so here a fully connected layer maps that vector to a map of a quarter of
the image side (`decoder_width` x 2 channels, BN-ReLU), and two stride-2 up-convolutions
(4 x 4 kernels, BN-ReLU after the first, as DCGAN's generator) bring it to the image size
(cropped to it when the side is not a multiple of 4). Dropout 0.5 on the features going
into that fully connected layer, as the paper's feature-learning runs ("just for the
channel-wise fully connected layer"); the dropout mask is drawn for the global batch too.

Adversarial loss: L = (1 - lambda_adv) * L_rec + lambda_adv * L_adv, the paper's 0.999 /
0.001 with `adversarial_weight=0.001`. The default is 0, reconstruction only, because the
paper's feature-learning experiments (classification, detection, segmentation transfer)
used the reconstruction loss alone: the authors could not make the adversarial loss converge
with their AlexNet encoder. The adversarial term sharpens inpaintings; the zoo publishes
the encoder, not the paintings. With `adversarial_weight > 0`:
a DCGAN discriminator (conv-LeakyReLU 0.2, conv-BN-LeakyReLU, linear logit) sees the
predicted region, with everything outside it zeroed, of the real image and of the
prediction; it is not conditioned on the context, like the paper's. The generator's term
is the non-saturating -log D(G(x)) of the released code, through the discriminator; the
discriminator's loss is the cross-entropy of real against painted. The discriminator is
kept out of `optimized_variables` and updated after the generator by its own Adam (lr
`discriminator_lr` 2e-4, beta_1 0.5, the released code's), from gradients taken in the same
forward pass (the released code also reuses D's output on the fake for both updates). That
optimizer is an attribute of the recipe, so checkpoints of the recipe save its state.

Augmentation: the released code's random crop and flip, as `recipes.semi.randaugment.
weak_view` (flip, translate up to `translate` of the side with reflection).
"""

import math

import keras
import tensorflow as tf

from recipes import precision
from recipes.augment import GlobalDraws
from recipes.base import Recipe, register
from recipes.losses import discriminator_loss, generator_adversarial_loss, reconstruction_loss
from recipes.semi.randaugment import weak_view

MASKS = ("center", "random_block", "random_region")
PAPER_OVERLAP = 7 / 128  # the paper's 7 px band around the 64 px hole of a 128 px image
REGION_GRID = 8  # cells of the random-region noise across the image (train_random.lua: 0.06 x 128)


def loss_weights(hole, region, overlap_weight):
    """1 on the hole, `overlap_weight` on the band (region minus hole), 0 elsewhere."""
    return hole + (region - hole) * overlap_weight


# ---- masks ---------------------------------------------------------------------------------
def central_masks(height: int, width: int, overlap: int):
    """(hole, region), [H, W] float32: the central square of half the side, and that square
    grown by `overlap` pixels on every side (what the decoder is asked to predict)."""
    hole_h, hole_w = height // 2, width // 2
    top, left = (height - hole_h) // 2, (width - hole_w) // 2
    if hole_h < 2 or hole_w < 2:
        raise ValueError(f"Image {height}x{width} is too small for a central mask (at least 4x4 px).")
    if overlap > min(top, left):
        raise ValueError(f"overlap={overlap} px does not fit around the central {hole_h}x{hole_w} hole of a "
                         f"{height}x{width} image (at most {min(top, left)}).")

    def square(y0, y1, x0, x1):
        rows = tf.cast((tf.range(height) >= y0) & (tf.range(height) < y1), tf.float32)
        cols = tf.cast((tf.range(width) >= x0) & (tf.range(width) < x1), tf.float32)
        return rows[:, None] * cols[None, :]

    hole = square(top, top + hole_h, left, left + hole_w)
    region = square(top - overlap, top + hole_h + overlap, left - overlap, left + hole_w + overlap)
    return hole, region


def block_size(height: int, width: int, num_blocks: int, coverage: float):
    """Side of each random block: `num_blocks` disjoint ones cover at most `coverage`."""
    scale = math.sqrt(coverage / num_blocks)
    return int(height * scale), int(width * scale)


def random_block_masks(draws: GlobalDraws, height: int, width: int, num_blocks: int, coverage: float):
    """[b, H, W] float32: the union of `num_blocks` squares at uniform positions per image."""
    bh, bw = block_size(height, width, num_blocks, coverage)
    tops = tf.floor(draws.uniform(shape=(num_blocks,)) * (height - bh + 1))  # [b, n] in [0, H - bh]
    lefts = tf.floor(draws.uniform(shape=(num_blocks,)) * (width - bw + 1))
    rows = tf.range(height, dtype=tf.float32)[None, None, :]
    cols = tf.range(width, dtype=tf.float32)[None, None, :]
    in_rows = (rows >= tops[..., None]) & (rows < tops[..., None] + bh)  # [b, n, H]
    in_cols = (cols >= lefts[..., None]) & (cols < lefts[..., None] + bw)  # [b, n, W]
    blocks = in_rows[:, :, :, None] & in_cols[:, :, None, :]  # [b, n, H, W]
    return tf.cast(tf.reduce_any(blocks, axis=1), tf.float32)


def random_region_masks(draws: GlobalDraws, height: int, width: int, coverage: float):
    """[b, H, W] float32: smooth blobs covering round(coverage * H * W) pixels of each image."""
    noise = draws.uniform(shape=(REGION_GRID + 1, REGION_GRID + 1, 1))
    smooth = tf.reshape(tf.image.resize(noise, (height, width), method="bilinear"), [-1, height * width])
    count = max(1, round(coverage * height * width))
    threshold = tf.sort(smooth, axis=1)[:, count - 1:count]  # the count-th smallest value per image
    return tf.reshape(tf.cast(smooth <= threshold, tf.float32), [-1, height, width])


def _mean_fill(encoder):
    """Pixel value in [0, 255] that the encoder's own normalization maps to 0 (per channel)."""
    try:
        mean = encoder.get_layer("normalize").mean
    except ValueError:  # no zoo normalization layer: mid-grey, zero of the [-1, 1] pixel scale
        return [127.5]
    return [255.0 * float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean])]


def build_decoder(feature_dim: int, image_shape, width: int, name="decoder") -> keras.Sequential:
    """Features [B, D] -> pixels [B, H, W, C] in [-1, 1]: FC to an (H/4, W/4) map, two up-convolutions."""
    height, image_width, channels = image_shape
    start_h, start_w = math.ceil(height / 4), math.ceil(image_width / 4)
    layers = [
        keras.Input((feature_dim,)),
        keras.layers.Dense(start_h * start_w * 2 * width, use_bias=False, name=f"{name}_fc"),
        keras.layers.Reshape((start_h, start_w, 2 * width)),
        keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_fc_bn"),
        keras.layers.ReLU(),
        keras.layers.Conv2DTranspose(width, 4, 2, padding="same", use_bias=False, name=f"{name}_up1"),
        keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_up1_bn"),
        keras.layers.ReLU(),
        keras.layers.Conv2DTranspose(channels, 4, 2, padding="same", name=f"{name}_up2"),
    ]
    extra_h, extra_w = 4 * start_h - height, 4 * start_w - image_width
    if extra_h or extra_w:
        layers.append(keras.layers.Cropping2D(((extra_h // 2, extra_h - extra_h // 2),
                                               (extra_w // 2, extra_w - extra_w // 2))))
    layers.append(keras.layers.Activation("tanh"))
    return keras.Sequential(layers, name=name)


def build_discriminator(image_shape, width: int, name="discriminator") -> keras.Sequential:
    """DCGAN's discriminator, two stride-2 stages: pixels in [-1, 1] -> one real/fake logit."""
    return keras.Sequential([
        keras.Input(tuple(image_shape)),
        keras.layers.Conv2D(width, 4, 2, padding="same", name=f"{name}_conv1"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Conv2D(2 * width, 4, 2, padding="same", use_bias=False, name=f"{name}_conv2"),
        keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn2"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Flatten(),
        keras.layers.Dense(1, name=f"{name}_logit"),
    ], name=name)


@register("inpainting")
class Inpainting(Recipe):
    """Context encoder: inpaint a dropped region from the encoder's features.

    Args:
      encoder: backbone to pretrain.
      mask: "random_block" (default), "center" or "random_region" (see the module docstring).
      num_blocks: squares per image for mask="random_block" (4).
      coverage: fraction of the image dropped: at most this for random blocks, exactly this
        for random regions (0.25, the paper's "up to 1/4"); the central hole is always 1/4.
      overlap: boundary band in px predicted beyond the central hole (mask="center" only);
        None = round(7/128 * side), the paper's proportion.
      overlap_weight: loss weight of that band relative to the hole (10, the paper's).
      decoder_width: channels of the decoder's last hidden map (64, DCGAN's ngf); the first has twice.
      dropout: dropout rate on the features entering the decoder's fully connected layer (0.5).
      adversarial_weight: lambda_adv; lambda_rec = 1 - lambda_adv (0 = reconstruction only, the
        paper's feature learning; 0.001 = the paper's inpainting).
      discriminator_width: channels of the discriminator's first conv (64, DCGAN's ndf).
      discriminator_lr: Adam learning rate of the discriminator (2e-4).
      translate: largest random shift of the view, fraction of the side (0.125); flips always.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      seed: augmentation, mask and dropout seed.
    """

    def __init__(self, encoder, mask="random_block", num_blocks=4, coverage=0.25, overlap=None, overlap_weight=10.0,
                 decoder_width=64, dropout=0.5, adversarial_weight=0.0, discriminator_width=64,
                 discriminator_lr=2e-4, translate=0.125, bn_splits=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        if mask not in MASKS:
            raise ValueError(f"Unknown mask {mask!r}. Valid masks: {', '.join(MASKS)}.")
        self.mask = mask
        self.num_blocks, self.coverage = int(num_blocks), float(coverage)
        self.overlap_weight = float(overlap_weight)
        self.decoder_width, self.dropout = int(decoder_width), float(dropout)
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator_width, self.discriminator_lr = int(discriminator_width), float(discriminator_lr)
        self.translate = float(translate)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.image_shape = tuple(int(d) for d in encoder.input_shape[1:])
        height, width, channels = self.image_shape
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        if not 0.0 < self.coverage < 1.0:
            raise ValueError(f"coverage must be in (0, 1), got {coverage}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if not 0.0 <= self.adversarial_weight < 1.0:
            raise ValueError(f"adversarial_weight must be in [0, 1) (lambda_rec = 1 - it), got {adversarial_weight}.")
        if self.overlap_weight <= 0:
            raise ValueError(f"overlap_weight must be positive, got {overlap_weight}.")
        if mask == "center":
            self.overlap = round(PAPER_OVERLAP * min(height, width)) if overlap is None else int(overlap)
            if self.overlap < 0:
                raise ValueError(f"overlap must be >= 0 px, got {overlap}.")
            central_masks(height, width, self.overlap)  # checks the image is large enough
        else:
            if overlap:
                raise ValueError(f"overlap applies to mask='center' only (the paper's boundary band); got "
                                 f"overlap={overlap} with mask={mask!r}.")
            self.overlap = 0
            if mask == "random_block" and min(block_size(height, width, self.num_blocks, self.coverage)) < 1:
                raise ValueError(f"Image {height}x{width} is too small for {self.num_blocks} blocks covering "
                                 f"{self.coverage} of it: lower num_blocks or raise coverage.")
        self.fill = _mean_fill(encoder)
        if len(self.fill) not in (1, channels):
            raise ValueError(f"The encoder's normalization mean has {len(self.fill)} values for {channels} channels.")

        feature_dim = encoder.output_shape[-1]
        self.decoder = build_decoder(feature_dim, self.image_shape, self.decoder_width)
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.discriminator = None
        if self.adversarial_weight > 0:
            self.discriminator = build_discriminator(self.image_shape, self.discriminator_width)
            self.discriminator_optimizer = precision.optimizer_for(
                keras.optimizers.Adam(self.discriminator_lr, beta_1=0.5, name="discriminator_adam"),
                self.dtype_policy.name)
            # Built here, under the recipe's strategy scope: built lazily inside a replicated step its
            # variables would not be mirrored (see recipes.checkpointing.build_optimizer).
            self.discriminator_optimizer.build(self.discriminator.trainable_variables)
            self.adversarial_tracker = keras.metrics.Mean(name="adversarial")
            self.discriminator_tracker = keras.metrics.Mean(name="discriminator")

    def get_config(self):
        return {**super().get_config(), "mask": self.mask, "num_blocks": self.num_blocks, "coverage": self.coverage,
                "overlap": self.overlap, "overlap_weight": self.overlap_weight, "decoder_width": self.decoder_width,
                "dropout": self.dropout, "adversarial_weight": self.adversarial_weight,
                "discriminator_width": self.discriminator_width, "discriminator_lr": self.discriminator_lr,
                "translate": self.translate, "bn_splits": self.bn_splits}

    @property
    def metrics(self):
        extra = [self.adversarial_tracker, self.discriminator_tracker] if self.discriminator is not None else []
        return [self.loss_tracker, self.reconstruction_tracker, *extra]

    @property
    def optimized_variables(self):
        """The encoder's and decoder's: the discriminator has its own optimizer."""
        if self.discriminator is None:
            return super().optimized_variables
        excluded = {id(v) for v in self.discriminator.trainable_variables}
        return [v for v in super().optimized_variables if id(v) not in excluded]

    # ---- masks ------------------------------------------------------------------------------
    def masks(self, seed, local_batch: int, global_batch: int):
        """(hole, region), [b, H, W, 1] float32 for this replica's rows of the global batch."""
        height, width, _ = self.image_shape
        if self.mask == "center":
            hole, region = central_masks(height, width, self.overlap)
            return (tf.tile(hole[None, :, :, None], [local_batch, 1, 1, 1]),
                    tf.tile(region[None, :, :, None], [local_batch, 1, 1, 1]))
        draws = GlobalDraws(seed, global_batch, local_batch)
        if self.mask == "random_block":
            hole = random_block_masks(draws, height, width, self.num_blocks, self.coverage)
        else:
            hole = random_region_masks(draws, height, width, self.coverage)
        return hole[..., None], hole[..., None]

    # ---- the step ---------------------------------------------------------------------------
    def loss_terms(self, data):
        images = data["image"]
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        dtype = self.compute_dtype
        splits = self.bn_splits or self.num_replicas
        views = tf.cast(weak_view(images, self.step_seed(1), global_batch, self.translate), dtype)
        hole, region = (tf.cast(m, dtype) for m in self.masks(self.step_seed(2), local_batch, global_batch))
        fill = tf.constant(self.fill, dtype)
        context = views * (1.0 - hole) + fill * hole
        targets = views / 127.5 - 1.0

        features = self.encode_in_groups(self.encoder, context, splits)
        if self.dropout:
            keep = GlobalDraws(self.step_seed(3), global_batch, local_batch).uniform(
                shape=(features.shape[-1],)) >= self.dropout
            features = features * tf.cast(keep, dtype) / (1.0 - self.dropout)
        predictions = self.encode_in_groups(self.decoder, features, splits)
        reconstruction = reconstruction_loss(predictions, targets, loss_weights(hole, region, self.overlap_weight))
        self.reconstruction_tracker.update_state(reconstruction)
        if self.discriminator is None:
            return tf.reduce_sum(reconstruction) / global_batch, {}

        # The discriminator sees the predicted region only (zero outside), of the real image and of the painting.
        real_logits = self.encode_in_groups(self.discriminator, region * targets, splits)[:, 0]
        fake_logits = self.encode_in_groups(self.discriminator, region * predictions, splits)[:, 0]
        adversarial = generator_adversarial_loss(fake_logits)
        critic = discriminator_loss(real_logits, fake_logits)
        self.adversarial_tracker.update_state(adversarial)
        self.discriminator_tracker.update_state(critic)
        losses = (1.0 - self.adversarial_weight) * reconstruction + self.adversarial_weight * adversarial
        return tf.reduce_sum(losses) / global_batch, {"discriminator_loss": tf.reduce_sum(critic) / global_batch}

    def loss_and_gradients(self, data):
        """The base's, plus the discriminator's gradients (of its own loss) in the state."""
        if self.discriminator is None:
            return super().loss_and_gradients(data)
        with tf.GradientTape(persistent=True) as tape:
            loss, state = self.loss_terms(data)
            scaled_loss = self.optimizer.scale_loss(loss)  # as the base's (recipes.precision)
            scaled_critic = self.discriminator_optimizer.scale_loss(state["discriminator_loss"])
        gradients = tape.gradient(scaled_loss, self.optimized_variables)
        state["discriminator_gradients"] = tape.gradient(scaled_critic, self.discriminator.trainable_variables)
        del tape
        return loss, gradients, state

    def after_update(self, data, state):
        """The discriminator's step (its optimizer sums the replicas' gradients, as the main one)."""
        if self.discriminator is not None:
            self.discriminator_optimizer.apply_gradients(
                zip(state["discriminator_gradients"], self.discriminator.trainable_variables))
