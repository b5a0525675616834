"""SeLa: self-labelling, clustering and representation learning by one objective.

Asano, Rupprecht, Vedaldi 2020, "Self-labelling via simultaneous clustering and
representation learning" (ICLR).

The network classifies every image into one of K clusters, and the cluster labels are
themselves learned: training alternates between
  1. the *label step*: predictions P for the whole training set, then the labels Q that
     minimize the cross-entropy to P under the constraint that the K clusters split the
     N images equally, found by Sinkhorn-Knopp on P^lambda
     (`recipes.losses.self_label_assignments`; lambda=25), each image taking its most
     likely cluster (hard labels);
  2. the *representation step*: ordinary cross-entropy training of encoder + classifier
     on the current labels, with InstDisc's augmentations (the paper's).
The equipartition constraint is what makes the joint objective non-degenerate: without
it, putting every image into one cluster would be optimal (DeepCluster's collapse,
which it patched by re-sampling and re-initializing).

Several clustering heads (`num_heads`, 10 in the paper), each a linear classifier over
the encoder's features with its own labels, trained at once; the loss is their mean.
The label step runs `num_label_updates` times, evenly spaced over the run, the first
before step 0, and relabels every head. The released code does this two other ways: its
ImageNet script spaces its `nopts` label steps quadratically (dense early: half of them
in the first quarter of training) and relabels every head; its CIFAR script spaces them
evenly but relabels one head per step, in turn, with lambda 10 (ours: 25, the ImageNet
value).

Where the label step runs: it needs the whole dataset, so it is not part of
`train_step`. `training_callbacks(images)` gives the Keras callback that runs it at the
scheduled steps (`python -m recipes.train` adds it; pass it to `fit` yourself when
training from Python). It predicts every image once through a training augmentation
(the paper's code labels with its training loader) with BatchNorm in inference mode
(the released code leaves the model in training mode, so it normalizes with each
batch's statistics), in batches on one device; the Sinkhorn-Knopp iterations are
deterministic, so every replica and every worker derives the same labels. Labels are a non-trainable variable:
checkpoints keep them and a resumed run continues with the labels it had.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from recipes import distribute
from recipes.augment import NPID, random_view
from recipes.base import Recipe, register
from recipes.losses import pretext_cross_entropy, self_label_assignments

UNLABELLED = -1


@register("sela")
class SeLa(Recipe):
    """Self-labelling with Sinkhorn-Knopp equipartitioned cluster labels.

    Args:
      encoder: backbone to pretrain.
      dataset_size: N, number of training images; batches must carry `index` in [0, N).
      num_clusters: K per head (3000 for ImageNet in the paper; 128, ~10x the classes of 10-class data).
      num_heads: clustering heads trained at once (10).
      lam: lambda of the label step (25).
      num_label_updates: label steps over the run, evenly spaced, the first at step 0.
      total_steps: optimizer steps of the run (set by `recipes.train`); spaces the label steps.
      label_batch_size: images per forward pass in the label step.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policy: augmentation fields to change from InstDisc's (a dict).
      seed: augmentation seed.
    """

    needs_index = True
    needs_total_steps = True

    def __init__(self, encoder, dataset_size=60000, num_clusters=128, num_heads=10, lam=25.0,
                 num_label_updates=100, total_steps=None, label_batch_size=1024, bn_splits=None, view_policy=None,
                 seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.dataset_size = int(dataset_size)
        self.num_clusters = int(num_clusters)
        self.num_heads = int(num_heads)
        self.lam = float(lam)
        self.num_label_updates = int(num_label_updates)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.label_batch_size = int(label_batch_size)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policy = NPID.updated(view_policy or {})
        if self.num_clusters < 2 or self.num_heads < 1 or self.num_label_updates < 1:
            raise ValueError(f"SeLa needs num_clusters >= 2, num_heads >= 1 and num_label_updates >= 1; got "
                             f"{self.num_clusters}, {self.num_heads}, {self.num_label_updates}.")
        if self.num_clusters > self.dataset_size:
            raise ValueError(f"num_clusters={self.num_clusters} exceeds the {self.dataset_size} images: "
                             "equal clusters need at least one image each.")
        features = encoder.output_shape[-1]
        self.heads = []
        for h in range(self.num_heads):
            head = keras.layers.Dense(self.num_clusters, name=f"cluster_head_{h}")
            head.build((None, features))
            self.heads.append(head)
        self.labels = self.add_weight(shape=(self.num_heads, self.dataset_size), dtype="int32", trainable=False,
                                      initializer=keras.initializers.Constant(UNLABELLED), name="labels")
        self.accuracy_tracker = keras.metrics.Mean(name="label_acc")
        self._predict = None

    def get_config(self):
        return {**super().get_config(), "dataset_size": self.dataset_size, "num_clusters": self.num_clusters,
                "num_heads": self.num_heads, "lam": self.lam, "num_label_updates": self.num_label_updates,
                "total_steps": self.total_steps, "label_batch_size": self.label_batch_size,
                "bn_splits": self.bn_splits, "view_policy": self.view_policy.to_config()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _classify(self, x, training):
        features = self.encoder(x, training=training)
        return tf.stack([head(features) for head in self.heads])  # [H, B, K]

    # ---- the representation step ------------------------------------------------
    def loss_terms(self, data):
        images, index = data["image"], self.dataset_index(data)
        global_batch = self.global_batch(images)
        labels = tf.gather(self.labels.value, index, axis=1)  # [H, B]
        check = tf.debugging.assert_non_negative(
            labels, message="SeLa's labels were never computed: run the label step first "
                            "(recipe.assign_labels(images), or fit with recipe.training_callbacks(images)).")
        with tf.control_dependencies([check]):
            logits = self.encode_in_groups(lambda x, training: tf.transpose(self._classify(x, training), [1, 0, 2]),
                                           random_view(images, self.step_seed(1), self.view_policy, global_batch),
                                           self.bn_splits or self.num_replicas)  # [B, H, K]
        logits = tf.transpose(logits, [1, 0, 2])
        losses = tf.add_n([pretext_cross_entropy(logits[h], labels[h]) for h in range(self.num_heads)])
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        self.accuracy_tracker.update_state(tf.cast(hits, tf.float32))
        return tf.reduce_sum(losses) / (self.num_heads * global_batch), {}

    # ---- the label step ------------------------------------------------------------
    def label_schedule(self) -> list[int]:
        """Optimizer steps before which the label step runs: evenly spaced, the first at 0."""
        if self.total_steps is None:
            raise ValueError("SeLa spaces its label steps over the run: pass total_steps (the optimizer "
                             "steps of the run) to the recipe.")
        updates = min(self.num_label_updates, max(self.total_steps, 1))
        return sorted({int(i * self.total_steps / updates) for i in range(updates)})

    def predict_log_probs(self, images, update: int = 0) -> np.ndarray:
        """[H, N, K] log-softmax of every head for every image, each seen through one training
        augmentation (drawn from `update`, so a label step is reproducible), BN in inference mode."""
        if len(images) != self.dataset_size:
            raise ValueError(f"The label step needs all {self.dataset_size} training images (the rows of "
                             f"the labels), got {len(images)}.")

        if self._predict is None:  # traced once per recipe, not once per label step
            @tf.function
            def predict(batch, update, start):
                seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 3], tf.int32), update)
                seed = tf.random.experimental.stateless_fold_in(seed, start)
                views = random_view(batch, seed, self.view_policy, self.label_batch_size)
                return tf.nn.log_softmax(self._classify(views, training=False), axis=-1)

            self._predict = predict

        out = np.empty((self.num_heads, len(images), self.num_clusters), np.float32)
        for start in range(0, len(images), self.label_batch_size):
            batch = images[start:start + self.label_batch_size]
            rows = len(batch)
            if rows < self.label_batch_size:  # one traced shape: pad the last batch, drop the padding
                batch = np.concatenate([batch, np.repeat(batch[-1:], self.label_batch_size - rows, axis=0)])
            out[:, start:start + rows] = self._predict(tf.constant(batch), tf.constant(update),
                                                       tf.constant(start))[:, :rows].numpy()
        return out

    def assign_labels(self, images, update: int = 0) -> np.ndarray:
        """The label step: new equipartitioned labels [H, N] for all images, stored and returned."""
        log_probs = self.predict_log_probs(images, update)
        labels = tf.stack([self_label_assignments(log_probs[h], self.lam)[0] for h in range(self.num_heads)])
        distribute.assign_synced([self.labels], [labels])
        return labels.numpy()

    def training_callbacks(self, images) -> list:
        return [SelfLabelling(self, images)]


class SelfLabelling(keras.callbacks.Callback):
    """Runs SeLa's label step before each scheduled optimizer step, and at the start of
    training if the labels were never computed (a run resumed before its first one)."""

    def __init__(self, recipe: SeLa, images):
        super().__init__()
        self.recipe, self.images = recipe, images
        self.schedule = recipe.label_schedule()

    def _label(self, step):
        update = max(sum(s <= step for s in self.schedule) - 1, 0)
        started = time.time()
        labels = self.recipe.assign_labels(self.images, update)
        sizes = np.bincount(labels[0], minlength=self.recipe.num_clusters)
        print(f"\nSeLa label step {update + 1}/{len(self.schedule)} before step {step}: "
              f"{time.time() - started:.1f} s; head 0's clusters hold {sizes.min()}-{sizes.max()} images "
              f"({len(self.images) / len(sizes):.0f} if equal).", flush=True)

    def on_train_begin(self, logs=None):
        step = int(self.recipe.optimizer.iterations.numpy())
        if step not in self.schedule and int(np.min(self.recipe.labels.numpy())) == UNLABELLED:
            self._label(step)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.recipe.optimizer.iterations.numpy())
        if step in self.schedule:
            self._label(step)
