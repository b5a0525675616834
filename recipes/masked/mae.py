"""MAE: masked autoencoders, masked image modelling with a Vision Transformer.

He, Chen, Xie, Li, Dollar, Girshick 2022, "Masked Autoencoders Are Scalable Vision
Learners" (CVPR).

The image is cut into patches and a random 75% of them is hidden, per image. The
encoder (a ViT, `zoo/vit.py`) sees only the visible 25%, with their position
embeddings and no mask tokens, which is what makes MAE cheap. A light decoder (its own
Transformer blocks) receives the encoded visible tokens back in their places, a shared
learned mask token in every hidden place, and position embeddings for all, and predicts
every patch's pixels. The loss is the mean squared error on the hidden patches only,
against pixels normalized per patch (`recipes.losses.masked_patch_mse`). After
pretraining the decoder is dropped: the encoder, run on all patches, is the published
model (mean-pooled tokens).

Masking per the paper's code: one uniform noise value per patch, the patches sorted by
it, the first (1 - ratio) kept; the noise is drawn for the global batch from the step's
seed and each replica takes its rows, so 1 and N replicas hide the same patches.
Augmentation: random resized crop (scale 0.2-1) and flip only.

Sizes: the paper's decoder is 8 blocks of 512 dimensions (16 heads) for ViT-B/L/H;
here `decoder_dim`, `decoder_depth`, `decoder_heads` size it to the encoder. The optimizer
is the training CLI's: the paper's is AdamW (betas 0.9, 0.95; wd 0.05; lr 1.5e-4 x batch /
256, a 40-epoch warm-up, cosine decay), which the CLI's flags reproduce (MAE's entry in
`benchmarks/fmnist_settings.py`). The paper's code exempts biases and norm layers (every
1-D parameter, timm's rule) from the decay; `compile` does the same with any optimizer.
"""

import keras
import tensorflow as tf

from recipes import distribute
from recipes.augment import MAE_VIEW, random_view
from recipes.base import Recipe, register
from recipes.losses import masked_patch_mse
from zoo import vit


def patchify(images, patch: int):
    """[B, H, W, C] -> [B, (H/p) * (W/p), p * p * C], patches in row-major order (the ViT's token order)."""
    _, height, width, channels = images.shape
    rows, cols = height // patch, width // patch
    x = tf.reshape(images, [-1, rows, patch, cols, patch, channels])
    x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
    return tf.reshape(x, [-1, rows * cols, patch * patch * channels])


def random_masking(noise, num_keep: int):
    """Per row of noise [B, N]: (indices of the kept patches [B, num_keep], indices that undo
    the shuffle [B, N], mask [B, N] with 1 on hidden patches), the paper's argsort scheme."""
    shuffle = tf.argsort(noise, axis=1)
    restore = tf.argsort(shuffle, axis=1)
    tokens = noise.shape[1]
    shuffled_mask = tf.concat([tf.zeros([tf.shape(noise)[0], num_keep]),
                               tf.ones([tf.shape(noise)[0], tokens - num_keep])], axis=1)
    return shuffle[:, :num_keep], restore, tf.gather(shuffled_mask, restore, batch_dims=1)


@register("mae")
class MAE(Recipe):
    """Masked autoencoder around a ViT encoder.

    Args:
      encoder: a ViT from `zoo.backbones` (`vit_*`); its patches are the masking unit.
      mask_ratio: fraction of patches hidden per image (0.75).
      decoder_dim, decoder_depth, decoder_heads: the decoder's Transformer (128, 2, 4 here;
        the paper's 512, 8, 16 are for ViT-B and larger).
      norm_pix_loss: predict per-patch normalized pixels (True, the paper's better target).
      view_policy: augmentation fields to change from MAE's (a dict).
      seed: augmentation and masking seed.
    """

    decay_vectors = False  # the paper's code decays weight matrices only

    def __init__(self, encoder, mask_ratio=0.75, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                 norm_pix_loss=True, view_policy=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.blocks = vit.transformer_blocks(encoder)
        if not self.blocks:
            raise ValueError(f"MAE masks the patches of a Vision Transformer; {encoder.name} is not one. "
                             f"Use --backbone=vit_tiny_p4 (28-64 px images) or vit_tiny_p16 (224 px).")
        self.mask_ratio = float(mask_ratio)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        self.decoder_dim, self.decoder_depth = int(decoder_dim), int(decoder_depth)
        self.decoder_heads = int(decoder_heads)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.view_policy = MAE_VIEW.updated(view_policy or {})

        self.stem, self.encoder_norm = vit.token_stem(encoder), vit.final_norm(encoder)
        self.patch = vit.patch_size(encoder)
        height, width, channels = encoder.input_shape[1:]
        rows, cols = height // self.patch, width // self.patch
        self.num_tokens = rows * cols
        self.num_keep = int(self.num_tokens * (1.0 - self.mask_ratio))  # the paper's int(L * (1 - ratio))
        token_dim = encoder.get_layer("patch_embed").filters

        self.decoder_embed = keras.layers.Dense(self.decoder_dim, name="decoder_embed")
        self.decoder_embed.build((None, None, token_dim))
        self.mask_token = self.add_weight(shape=(1, 1, self.decoder_dim), name="mask_token",
                                          initializer=keras.initializers.RandomNormal(stddev=0.02))
        self.decoder_position = vit.SinCosPositionEmbedding(rows, cols, name="decoder_position")
        self.decoder_position.build((None, self.num_tokens, self.decoder_dim))
        self.decoder_blocks = [vit.TransformerBlock(self.decoder_dim, self.decoder_heads, name=f"decoder_block{i + 1}")
                               for i in range(self.decoder_depth)]
        for block in self.decoder_blocks:
            block.build((None, self.num_tokens, self.decoder_dim))
        self.decoder_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="decoder_norm")
        self.decoder_norm.build((None, self.num_tokens, self.decoder_dim))
        self.decoder_pred = keras.layers.Dense(self.patch * self.patch * channels, name="decoder_pred")
        self.decoder_pred.build((None, self.num_tokens, self.decoder_dim))

    def get_config(self):
        return {**super().get_config(), "mask_ratio": self.mask_ratio, "decoder_dim": self.decoder_dim,
                "decoder_depth": self.decoder_depth, "decoder_heads": self.decoder_heads,
                "norm_pix_loss": self.norm_pix_loss, "view_policy": self.view_policy.to_config()}

    def encode_visible(self, images, keep):
        """Encoder on the kept patches only: [B, num_keep, dim]."""
        x = tf.gather(self.stem(images), keep, batch_dims=1)
        for block in self.blocks:
            x = block(x, training=True)
        return self.encoder_norm(x)

    def decode(self, visible, restore):
        """Pixels of every patch [B, N, p*p*C] from the encoded visible tokens."""
        x = self.decoder_embed(visible)
        hidden = tf.shape(restore)[1] - tf.shape(x)[1]
        mask_tokens = tf.tile(tf.cast(self.mask_token, x.dtype), [tf.shape(x)[0], hidden, 1])
        x = tf.gather(tf.concat([x, mask_tokens], axis=1), restore, batch_dims=1)  # back in place
        x = self.decoder_position(x)
        for block in self.decoder_blocks:
            x = block(x, training=True)
        return self.decoder_pred(self.decoder_norm(x))

    def loss_terms(self, data):
        images = data["image"]
        local_batch, global_batch = images.shape[0], self.global_batch(images)
        views = random_view(images, self.step_seed(1), self.view_policy, global_batch)
        noise = tf.random.stateless_uniform([global_batch, self.num_tokens], self.step_seed(2), dtype=tf.float32)
        keep, restore, mask = random_masking(distribute.replica_slice(noise, local_batch), self.num_keep)
        predictions = self.decode(self.encode_visible(views, keep), restore)
        losses = masked_patch_mse(predictions, patchify(views / 255.0, self.patch), mask, self.norm_pix_loss)
        return tf.reduce_sum(losses) / global_batch, {}
