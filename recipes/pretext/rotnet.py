"""RotNet: learn features by predicting which of four rotations an image was given.

Gidaris, Singh, Komodakis 2018, "Unsupervised Representation Learning by Predicting
Image Rotations" (ICLR).

Every image of the batch is shown in all four rotations, 0, 90, 180 and 270 degrees,
in the same step (the paper found this better than one random rotation per image), and
the network classifies the rotation with a 4-way softmax; the loss is the cross-entropy
averaged over the 4B rotated images (`recipes.losses.pretext_cross_entropy`). To tell
an upright shoe from one upside down the encoder has to find the shoe and its parts:
the pretext task needs no labels but does need the object.

Where the features come from: on ImageNet the paper's AlexNet RotNet classifies with its
fully connected layers and the features are taken from the convolutions below them,
because the last layers specialize to the pretext task. Here the encoder (the convs, up
to global pooling) is what the zoo publishes, and the rotation classifier is an MLP head
on top (`hidden_dim`, one BN-ReLU hidden layer; 0 makes it linear). On CIFAR the paper's
4-block NIN gave its best features at block 2, with two conv blocks above it (table 1);
our published features are the last block's, below only the MLP head, so they may be more
specialized to rotations than the paper's best. Augmentation before
rotating: the paper's CIFAR code's random crop (4-pixel padding, i.e. 12.5% of 32) and
horizontal flip, as `recipes.semi.randaugment.weak_view` (translate with reflection).
Rotations by 90 degrees need square images.
"""

import keras
import tensorflow as tf

from recipes.base import Recipe, register
from recipes.heads import mlp
from recipes.losses import pretext_cross_entropy
from recipes.semi.randaugment import weak_view

NUM_ROTATIONS = 4


def rotate_all(images):
    """[B, S, S, C] -> ([4B, S, S, C], rotation labels [4B]): every image at 0, 90, 180 and
    270 degrees counter-clockwise, grouped by rotation (rows k*B..(k+1)*B-1 have label k)."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"RotNet rotates by 90 degrees and needs square images, got {images.shape[1]}x"
                         f"{images.shape[2]}; train on a square --image_size.")
    rotated = [tf.image.rot90(images, k) for k in range(NUM_ROTATIONS)]
    labels = tf.repeat(tf.range(NUM_ROTATIONS), tf.shape(images)[0])
    return tf.concat(rotated, axis=0), labels


@register("rotnet")
class RotNet(Recipe):
    """Rotation prediction (all four rotations of every image in each batch).

    Args:
      encoder: backbone to pretrain.
      hidden_dim: width of the rotation head's hidden layer (512; 0 = a linear classifier).
      translate: largest random shift before rotating, fraction of the side (0.125).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      seed: augmentation seed.
    """

    def __init__(self, encoder, hidden_dim=512, translate=0.125, bn_splits=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.hidden_dim = int(hidden_dim)
        self.translate = float(translate)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        layers = 2 if self.hidden_dim else 1
        self.head = mlp(self.hidden_dim, NUM_ROTATIONS, num_layers=layers, batch_norm=True, name="rotation_head")
        self.head.build((None, encoder.output_shape[-1]))
        self.accuracy_tracker = keras.metrics.Mean(name="rotation_acc")

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim, "translate": self.translate,
                "bn_splits": self.bn_splits}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def rotation_logits(self, images, training=True):
        """Logits [4B, 4] and labels [4B] of the four rotations of every image.

        BatchNorm groups (`bn_splits`) are formed from the images *before* rotating, so
        every group holds all four rotations of its images: a group of one rotation
        would let its batch statistics give the rotation away.
        """
        splits = self.bn_splits or self.num_replicas
        groups = splits // self.num_replicas  # encode_in_groups checks it divides

        def classify_rotations(x, training):
            return self.head(self.encoder(rotate_all(x)[0], training=training), training=training)

        logits = self.encode_in_groups(classify_rotations, images, splits, training=training)
        group_labels = tf.repeat(tf.range(NUM_ROTATIONS), images.shape[0] // groups)
        return logits, tf.tile(group_labels, [groups])

    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        views = weak_view(images, self.step_seed(1), global_batch, self.translate)
        logits, labels = self.rotation_logits(views)
        losses = pretext_cross_entropy(logits, labels)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32)
        self.accuracy_tracker.update_state(hits)
        return tf.reduce_sum(losses) / (NUM_ROTATIONS * global_batch), {}
