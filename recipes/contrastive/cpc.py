"""CPC v2: Contrastive Predictive Coding on a grid of image patches.

van den Oord, Li, Vinyals 2018, "Representation Learning with Contrastive Predictive
Coding"; Henaff et al. 2019/2020, "Data-Efficient Image Recognition with Contrastive
Predictive Coding" (ICML 2020), the "v2" recipe followed here.

An image is cut into an overlapping grid of patches (the paper: 64 px patches with
stride 32 on 256 px crops, a 7x7 grid; here `patch_size` / `patch_stride` of the
dataset's side). Each patch is encoded on its own by the backbone and pooled to a
latent z_{i,j}. A *masked* (causal) context network reads the latents top to bottom:
its output c_{i,j} depends only on rows <= i. From c_{i,j} a linear map W_k predicts
the latent k rows below, z_hat_{i+k,j} = W_k c_{i,j}, for k = s..s+K-1, and InfoNCE asks
each prediction to pick its true latent out of the latents of every other patch, of
this image and of the other images of the *global* batch (gathered across replicas
with a correct gradient).

The first step s (`first_step`) skips the rows whose patches overlap the context's own
row: with 50% overlap the patch one row below shares half its pixels with a patch c_{i,j}
has seen, so predicting it is partly copying. s defaults to ceil(patch_size /
patch_stride), the first row that shares no pixel (2 at 50% overlap). That row still
touches the context row's edge; the paper's pseudocode (appendix A.2, `steps_to_ignore=2`)
goes one row further, to the row 3 below at 50% overlap, a full stride away, which
`first_step=3` gives (on a grid of at least 3 + K rows; not yet measured here).

The context network is a stack of residual blocks of row-causal convolutions (a
(h x 3) kernel padded only above), a small stand-in for the paper's 12-block
PixelCNN-style ResNet; every patch is augmented independently (`CPC_PATCH`).

What the zoo publishes. The zoo contract is images in, (N, D) out, so the published
encoder is the patch encoder applied over the whole patch grid of a full image and
averaged over patches (the paper's linear evaluation also pools the patch grid). It
is built only from standard Keras layers: a frozen identity convolution extracts
the patches, `TimeDistributed` runs the shared patch encoder on each, and global
average pooling averages them; it therefore loads and serves without this module.
`recipe.encoder` is that model; `recipe.patch_encoder` is the backbone on one patch.

Normalization: CPC v2 replaces BatchNorm in the encoder by layer normalization (sec.
4.1), because batch statistics computed over patches of one image let information
pass between the context and the patches it predicts. `recipes.train` therefore builds
CPC's backbone with `norm="layer"` (`backbone_norm`; `--backbone_norm=batch` gives the
BatchNorm encoder of the quality table's CPC row, where a BN group's statistics come
from the patches of several images).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from recipes import distribute
from recipes.augment import CPC_PATCH, random_view
from recipes.base import Recipe, register
from recipes.heads import at_input_shape
from recipes.losses import cpc_info_nce


def grid_size(side: int, patch_size: int, patch_stride: int) -> int:
    if patch_size > side:
        raise ValueError(f"patch_size={patch_size} exceeds the image side {side}.")
    return (side - patch_size) // patch_stride + 1


def patch_extractor(image_shape, patch_size: int, patch_stride: int, name="patches") -> keras.Model:
    """Images [N, H, W, C] -> patches [N, G*G, P, P, C] from standard layers only.

    A Conv2D with a fixed one-hot kernel copies each P x P x C window into its
    output channels, in the same (row, column, channel) order as
    `tf.image.extract_patches`; a Reshape then lays the windows out as patches.
    """
    height, width, channels = image_shape
    rows, cols = grid_size(height, patch_size, patch_stride), grid_size(width, patch_size, patch_stride)
    window = patch_size * patch_size * channels
    kernel = np.eye(window, dtype="float32").reshape(patch_size, patch_size, channels, window)
    images = keras.Input(shape=image_shape, name="images")
    x = layers.Rescaling(1.0, name=f"{name}_to_float")(images)
    conv = layers.Conv2D(window, patch_size, strides=patch_stride, use_bias=False, trainable=False,
                         name=f"{name}_window")
    x = conv(x)
    conv.set_weights([kernel])
    x = layers.Reshape((rows * cols, patch_size, patch_size, channels), name=f"{name}_grid")(x)
    return keras.Model(images, x, name=name)


def causal_context_network(dim: int, hidden_dim: int, num_blocks: int, kernel_rows: int = 2,
                           name="context") -> keras.Model:
    """Latents [N, G, G, D] -> context [N, G, G, hidden]; output row i sees input rows <= i.

    Each convolution has a (kernel_rows x 3) kernel with zero padding only above
    (and one column each side), so information flows downward and sideways, never up.
    """
    latents = keras.Input(shape=(None, None, dim), name="latents")

    def causal_conv(x, filters, block, index):
        x = layers.ZeroPadding2D(((kernel_rows - 1, 0), (1, 1)), name=f"{name}_{block}_pad{index}")(x)
        return layers.Conv2D(filters, (kernel_rows, 3), name=f"{name}_{block}_conv{index}")(x)

    x = layers.Conv2D(hidden_dim, 1, name=f"{name}_in")(latents)
    for block in range(num_blocks):
        y = causal_conv(layers.ReLU(name=f"{name}_{block}_relu1")(x), hidden_dim, block, 1)
        y = causal_conv(layers.ReLU(name=f"{name}_{block}_relu2")(y), hidden_dim, block, 2)
        x = layers.Add(name=f"{name}_{block}_add")([x, y])
    return keras.Model(latents, x, name=name)


def grid_encoder(patch_encoder, image_shape, patch_size, patch_stride, name) -> keras.Model:
    """The published model: full images -> patch encoder on every patch -> mean over patches."""
    images = keras.Input(shape=image_shape, name="images")
    patches = patch_extractor(image_shape, patch_size, patch_stride)(images)
    latents = layers.TimeDistributed(patch_encoder, name="patch_encoder")(patches)
    features = layers.GlobalAveragePooling1D(name="pool_patches")(latents)
    return keras.Model(images, features, name=f"cpc_{name}")


@register("cpc")
class CPC(Recipe):
    """CPC v2.

    Build the encoder with `zoo.backbones.build(..., norm="layer")` to follow the paper
    (what `recipes.train` does); a BatchNorm encoder trains too.

    Args:
      encoder: backbone; it becomes the patch encoder (same layers and weights, taking
        patch_size x patch_size inputs).
      patch_size, patch_stride: patch grid (50% overlap as in the paper by default:
        8 / 4 gives a 6x6 grid on 28 px images, 3x3 on 16 px).
      prediction_steps: K, how many rows to predict (s + K - 1 <= grid rows - 1).
      first_step: s, the nearest row predicted; None = ceil(patch_size / patch_stride), the
        first row whose patches share no pixel with the context's row.
      context_dim: channels of the context network.
      context_blocks: residual blocks of the context network.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policy: per-patch augmentation fields to change from `CPC_PATCH` (a dict).
      seed: augmentation seed.
    """

    backbone_norm = "layer"

    def __init__(self, encoder, patch_size=8, patch_stride=4, prediction_steps=3, first_step=None, context_dim=256,
                 context_blocks=2, bn_splits=None, view_policy=None, seed=0, **kwargs):
        image_shape = tuple(encoder.input_shape[1:])
        patch_size, patch_stride = int(patch_size), int(patch_stride)
        rows = grid_size(image_shape[0], patch_size, patch_stride)
        cols = grid_size(image_shape[1], patch_size, patch_stride)
        first_step = -(-patch_size // patch_stride) if first_step is None else int(first_step)
        if first_step < 1 or prediction_steps < 1 or first_step + prediction_steps - 1 > rows - 1:
            raise ValueError(f"Rows {first_step}..{first_step + prediction_steps - 1} ahead (first_step, "
                             f"prediction_steps={prediction_steps}) must lie in 1..{rows - 1} for a {rows}-row patch "
                             f"grid; lower them or the patch stride.")
        patch_encoder = at_input_shape(encoder, (patch_size, patch_size, image_shape[2]),
                                       name=f"{encoder.name}_patch")
        published = grid_encoder(patch_encoder, image_shape, patch_size, patch_stride, encoder.name)
        super().__init__(published, seed=seed, **kwargs)
        self.patch_encoder = patch_encoder
        self.patch_size, self.patch_stride, self.rows, self.cols = patch_size, patch_stride, rows, cols
        self.prediction_steps, self.first_step = int(prediction_steps), first_step
        self.context_dim = int(context_dim)
        self.context_blocks = int(context_blocks)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policy = CPC_PATCH.updated(view_policy or {})
        latent_dim = patch_encoder.output_shape[-1]
        self.context_network = causal_context_network(latent_dim, self.context_dim, self.context_blocks)
        # W_k: one linear prediction per step k, from context to latent space.
        self.predictors = [layers.Dense(latent_dim, use_bias=False, name=f"predict_{k}") for k in self.steps]
        for predictor in self.predictors:
            predictor.build((None, self.context_dim))

    @property
    def steps(self) -> range:
        """The rows ahead that are predicted, k = s..s+K-1."""
        return range(self.first_step, self.first_step + self.prediction_steps)

    @property
    def metrics(self):
        # Listed explicitly: without it Keras does not report the base's loss tracker.
        return [self.loss_tracker]

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "patch_stride": self.patch_stride,
                "prediction_steps": self.prediction_steps, "first_step": self.first_step,
                "context_dim": self.context_dim, "context_blocks": self.context_blocks, "bn_splits": self.bn_splits,
                "view_policy": self.view_policy.to_config()}

    def _latents(self, images, global_batch):
        """[b, G, G, D] latents of independently augmented patches."""
        local_batch, channels = images.shape[0], images.shape[-1]
        size, stride = self.patch_size, self.patch_stride
        patches = tf.image.extract_patches(tf.cast(images, keras.config.floatx()), [1, size, size, 1],
                                           [1, stride, stride, 1], [1, 1, 1, 1], "VALID")
        per_image = self.rows * self.cols
        patches = tf.reshape(patches, [local_batch * per_image, size, size, channels])
        # Patch rows are image-major, so the global-batch draws slice per replica correctly.
        patches = random_view(patches, self.step_seed(1), self.view_policy, global_batch * per_image)
        splits = self.bn_splits or self.num_replicas
        latents = self.encode_in_groups(self.patch_encoder, patches, splits)
        return tf.reshape(latents, [local_batch, self.rows, self.cols, -1])

    def loss_terms(self, data):
        images = data["image"]
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        latents = self._latents(images, global_batch)
        context = self.context_network(latents, training=True)
        dim = latents.shape[-1]
        # Every patch of the global batch is a candidate; patch (b, i, j) is row (b*G + i)*G + j.
        candidates = distribute.all_gather(tf.reshape(latents, [-1, dim]))
        first_image = tf.cast(distribute.replica_id(), tf.int32) * local_batch
        image_ids = tf.range(local_batch)[:, None, None] + first_image
        cols = tf.range(self.cols)[None, None, :]
        total, count = 0.0, 0
        for k, predictor in zip(self.steps, self.predictors):
            source_rows = self.rows - k
            predictions = predictor(tf.reshape(context[:, :source_rows], [-1, self.context_dim]))
            target_rows = tf.range(k, self.rows)[None, :, None]
            target = tf.reshape((image_ids * self.rows + target_rows) * self.cols + cols, [-1])
            total += tf.reduce_sum(cpc_info_nce(predictions, candidates, target))
            count += source_rows * self.cols
        # Mean over every prediction of the global batch.
        return total / (global_batch * count), {}
