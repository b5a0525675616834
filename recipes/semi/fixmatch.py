"""FixMatch: pseudo-labels from weak views teach strong views, in every step.

Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency
and Confidence" (NeurIPS).

Per step (Algorithm 1 of the paper), with B labelled and mu*B unlabelled images:
  * supervised loss: cross-entropy of the weak views of the labelled batch,
        l_s = 1/B sum_b H(y_b, p(weak(x_b)));
  * unsupervised loss: each unlabelled image's weak view gives a prediction q_b; if
    max q_b >= tau (0.95) its argmax is a hard pseudo-label for the *strong* view
    (RandAugment + Cutout) of the same image:
        l_u = 1/(mu B) sum_b 1(max q_b >= tau) H(argmax q_b, p(strong(u_b)));
  * loss = l_s + lambda_u * l_u (lambda_u = 1).
Consistency regularization (strong must agree with weak) and pseudo-labelling
(confidence threshold, hard labels) in one term. Evaluation uses an exponential
moving average of the weights (decay 0.999).

Batch normalization: the reference code runs the labelled, weak and strong images
as one batch, so BN sees all three. Here the concatenation is done per group of
`bn_splits` equal groups of the global batch (default: one group per replica), each
group holding its share of all three parts; the computation is then the same on 1
device with `bn_splits=N` as on N replicas. (The reference code instead splits the
concatenated batch into contiguous chunks per GPU, so its devices see different mixes.)

Distribution alignment (optional, `distribution_alignment=True`; not in FixMatch,
from ReMixMatch, Berthelot et al. 2020, sec. 3.2): before the threshold, each weak
prediction is multiplied by p(y) / (the model's mean prediction over the last
`alignment_window` = 128 global batches of unlabelled images) and renormalized, where
p(y) is the labelled images' class distribution (`run_fixmatch` measures it; uniform
for --labels_per_class), so a class the model rarely predicts (on Fashion-MNIST with
100 labels: shirts) can get confident pseudo-labels again. Measured there, it led the
unaligned run by only 0.1-0.2 points over the first 2,800 steps, and shirts stayed the
weakest class (benchmarks/RESULTS.md).

Training schedule of the paper (set by the caller, see `paper_optimizer`): SGD with
Nesterov momentum 0.9, learning rate 0.03 decayed as cos(7 pi k / 16 K), weight
decay 5e-4 as an L2 term on the kernels (`recipes.optimizers.SGDL2`), B = 64, mu = 7.
The paper's unlabelled set is the whole training set, labelled images included; pass
it that way to `fixmatch_dataset` to match.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from recipes import distribute
from recipes.base import Recipe, register
from recipes.checkpointing import SaveEveryEpoch, resume
from recipes.optimizers import SGDL2
from recipes.semi.finetune import classifier_model
from recipes.semi.losses import class_distribution, fixmatch_unlabelled_loss, sparse_cross_entropy
from recipes.semi.randaugment import StrongPolicy, strong_view, weak_view


@register("fixmatch")
class FixMatch(Recipe):
    """FixMatch with RandAugment (random magnitude) + Cutout strong views.

    Args:
      encoder: backbone (images in [0, 255] -> features), published as `.encoder`.
      num_classes: classes of the linear classifier.
      threshold: tau, confidence needed for a pseudo-label (0.95).
      lambda_u: weight of the unlabelled loss (1).
      mu: unlabelled images per labelled image in a batch (7); checked against the
        batch.
      ema_decay: decay of the weight EMA used for evaluation (0.999).
      translate: weak view's largest translation, fraction of the side (0.125).
      strong_policy: dict of `StrongPolicy` (default N=2, random magnitude, Cutout 0.5).
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      distribution_alignment: align weak predictions to `alignment_target` before
        thresholding (ReMixMatch's; off in FixMatch).
      alignment_window: batches in the running mean prediction (128, ReMixMatch's).
      alignment_target: the class distribution p(y) to align to (num_classes
        non-negative weights, normalized here); None = uniform.
      label_count: labelled examples behind this model, for the model card.
      seed: augmentation seed.
    """

    def __init__(self, encoder, num_classes, threshold=0.95, lambda_u=1.0, mu=7, ema_decay=0.999,
                 translate=0.125, strong_policy=None, bn_splits=None, distribution_alignment=False,
                 alignment_window=128, alignment_target=None, label_count=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.num_classes = int(num_classes)
        self.threshold = float(threshold)
        self.lambda_u = float(lambda_u)
        self.mu = int(mu)
        self.ema_decay = float(ema_decay)
        self.translate = float(translate)
        self.strong_policy = StrongPolicy.from_config(strong_policy or {})
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.label_count = label_count
        self.distribution_alignment = bool(distribution_alignment)
        self.alignment_window = int(alignment_window)
        if self.alignment_window < 1:
            raise ValueError(f"alignment_window must be >= 1 batch, got {alignment_window}.")
        self.alignment_target = None if alignment_target is None else \
            class_distribution(alignment_target, self.num_classes)
        if self.distribution_alignment:
            # One mean prediction per recent global batch, uniform until real ones replace them.
            self.prediction_history = self.add_weight(
                shape=(self.alignment_window, self.num_classes), trainable=False, name="prediction_history",
                initializer=keras.initializers.Constant(1.0 / self.num_classes))

        feature_dim = encoder.output_shape[-1]
        self.classifier = keras.layers.Dense(self.num_classes, name="classifier")
        self.classifier.build((None, feature_dim))
        # The EMA copy is what FixMatch evaluates (and what we publish).
        self.ema_encoder = keras.models.clone_model(encoder)
        self.ema_encoder.set_weights(encoder.get_weights())
        self.ema_encoder.trainable = False
        self.ema_classifier = keras.layers.Dense(self.num_classes, name="ema_classifier")
        self.ema_classifier.build((None, feature_dim))
        self.ema_classifier.set_weights(self.classifier.get_weights())
        self.ema_classifier.trainable = False

        self.supervised_tracker = keras.metrics.Mean(name="supervised_loss")
        self.unsupervised_tracker = keras.metrics.Mean(name="unsupervised_loss")
        self.mask_tracker = keras.metrics.Mean(name="mask_rate")
        self.pseudo_accuracy_tracker = keras.metrics.Mean(name="pseudo_label_accuracy")
        self._predict_fn = None

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "threshold": self.threshold,
                "lambda_u": self.lambda_u, "mu": self.mu, "ema_decay": self.ema_decay,
                "translate": self.translate, "strong_policy": self.strong_policy.to_config(),
                "bn_splits": self.bn_splits, "distribution_alignment": self.distribution_alignment,
                "alignment_window": self.alignment_window, "alignment_target": self.alignment_target,
                "label_count": self.label_count}

    @property
    def metrics(self):
        return [self.loss_tracker, self.supervised_tracker, self.unsupervised_tracker, self.mask_tracker,
                self.pseudo_accuracy_tracker]

    # ---- model ---------------------------------------------------------------------
    def call(self, data, training=False):
        """Logits of the online model (the EMA model is `ema_logits`)."""
        images = data["image"] if isinstance(data, dict) else data
        return self.classifier(self.encoder(images, training=training))

    def ema_logits(self, images):
        return self.ema_classifier(self.ema_encoder(images, training=False))

    def _joint_logits(self, parts):
        """Logits of several batches run together through BN, group by group.

        Each part is split into this replica's BN groups; group g of every part is
        concatenated, encoded, and the logits are split back, so a group's BN
        statistics cover its share of labelled, weak and strong images.
        """
        splits = self.num_replicas if self.bn_splits is None else self.bn_splits
        if splits % self.num_replicas:
            raise ValueError(f"bn_splits={splits} must be a multiple of the {self.num_replicas} replicas.")
        groups = splits // self.num_replicas
        for part in parts:
            if part.shape[0] % groups:
                raise ValueError(f"Per-replica batch {part.shape[0]} is not divisible into {groups} BN groups.")
        pieces = [tf.split(part, groups) for part in parts]
        outputs = [[] for _ in parts]
        for g in range(groups):
            group = [p[g] for p in pieces]
            logits = self(tf.concat(group, axis=0), training=True)
            for i, chunk in enumerate(tf.split(logits, [x.shape[0] for x in group])):
                outputs[i].append(chunk)
        return [tf.concat(chunks, axis=0) for chunks in outputs]

    # ---- training --------------------------------------------------------------------
    def loss_terms(self, data):
        labelled, labels, unlabelled = data["image"], data["label"], data["unlabelled_image"]
        batch = self.global_batch(labelled)
        unlabelled_batch = self.global_batch(unlabelled)
        if unlabelled_batch != self.mu * batch:
            raise ValueError(f"Expected mu*B = {self.mu}*{batch} unlabelled images, got {unlabelled_batch}; "
                             "build the data with fixmatch_dataset(..., mu=recipe.mu).")
        weak_labelled = weak_view(labelled, self.step_seed(1), batch, self.translate)
        weak = weak_view(unlabelled, self.step_seed(2), unlabelled_batch, self.translate)
        strong = strong_view(weak_view(unlabelled, self.step_seed(3), unlabelled_batch, self.translate),
                             self.step_seed(4), unlabelled_batch, self.strong_policy)
        logits_l, logits_w, logits_s = self._joint_logits([weak_labelled, weak, strong])

        supervised = sparse_cross_entropy(labels, logits_l)
        prediction_mean, state = None, {}
        if self.distribution_alignment:
            history = self._prediction_history_with(logits_w)
            prediction_mean, state = tf.reduce_mean(history, axis=0), {"prediction_history": history}
        unsupervised, mask, pseudo_labels = fixmatch_unlabelled_loss(logits_w, logits_s, self.threshold,
                                                                     prediction_mean, self.alignment_target)
        supervised_loss = tf.reduce_sum(supervised) / batch
        unsupervised_loss = tf.reduce_sum(unsupervised) / unlabelled_batch
        # Trackers average over replicas, so they get each replica's share times N.
        replicas = self.num_replicas
        self.supervised_tracker.update_state(supervised_loss * replicas)
        self.unsupervised_tracker.update_state(unsupervised_loss * replicas)
        self.mask_tracker.update_state(mask)
        if "unlabelled_label" in data:  # monitoring only: true labels never enter the loss
            correct = tf.cast(tf.equal(pseudo_labels, tf.cast(data["unlabelled_label"], tf.int32)), tf.float32)
            self.pseudo_accuracy_tracker.update_state(correct, sample_weight=mask)
        return supervised_loss + self.lambda_u * unsupervised_loss, state

    def _prediction_history_with(self, weak_logits):
        """The history with this global batch's mean weak prediction in its ring slot.

        The mean is over the global batch (gathered from every replica), so all
        replicas hold the same history and align with the same mean.
        """
        probabilities = tf.nn.softmax(tf.stop_gradient(weak_logits), axis=-1)
        batch_mean = tf.reduce_mean(distribute.all_gather(probabilities), axis=0)
        slot = tf.cast(self.optimizer.iterations % self.alignment_window, tf.int32)
        return tf.tensor_scatter_nd_update(self.prediction_history.value, [[slot]],
                                           batch_mean[None, :])

    def after_update(self, data, state):
        """EMA of all float weights, BN moving statistics included (the reference TF code
        averages only the trainable weights and evaluates with the online model's BN
        statistics); the prediction history of distribution alignment."""
        targets, values = [], []
        if "prediction_history" in state:
            targets.append(self.prediction_history)
            values.append(state["prediction_history"])
        for online, ema in ((self.encoder, self.ema_encoder), (self.classifier, self.ema_classifier)):
            for w_online, w_ema in zip(online.weights, ema.weights):
                if w_ema.dtype.startswith("float"):
                    targets.append(w_ema)
                    values.append(self.ema_decay * w_ema.value + (1.0 - self.ema_decay) * w_online.value)
        distribute.assign_synced(targets, values)

    # ---- inference -------------------------------------------------------------------
    def predict_proba(self, images, batch_size=256):
        """EMA-model class probabilities [N, K] in inference mode."""
        if self._predict_fn is None:
            self._predict_fn = tf.function(lambda x: tf.nn.softmax(self.ema_logits(x), axis=-1),
                                           reduce_retracing=True)
        outputs = [self._predict_fn(tf.constant(images[i:i + batch_size])).numpy()
                   for i in range(0, len(images), batch_size)]
        return np.concatenate(outputs, axis=0)

    def accuracy(self, images, labels, batch_size=256):
        return float(np.mean(self.predict_proba(images, batch_size).argmax(axis=1) == np.asarray(labels)))

    @property
    def exported_encoder(self):
        """The EMA encoder: FixMatch's evaluated model, hence the one to publish."""
        return self.ema_encoder

    @property
    def exported_classifier(self):
        """The EMA model as images -> class probabilities, published beside the encoder."""
        return classifier_model(self.ema_encoder, self.ema_classifier)


def fixmatch_dataset(labelled_images, labels, unlabelled_images, batch_size=64, mu=7, seed=0,
                     unlabelled_labels=None):
    """Endless batches `{"image": uint8 [B,...], "label": int64 [B], "unlabelled_image": uint8 [mu*B,...]}`.

    Labelled and unlabelled sets are shuffled and repeated independently (the
    labelled set is much smaller and cycles faster). `unlabelled_labels`, if given,
    adds "unlabelled_label" for monitoring pseudo-label accuracy only.
    """
    from recipes.data import make_dataset  # imported here: data.py pulls in tensorflow_datasets

    labelled = make_dataset(labelled_images, labels, batch_size=batch_size, shuffle=True, seed=seed,
                            repeat=True)
    unlabelled = make_dataset(unlabelled_images, unlabelled_labels, batch_size=mu * batch_size, shuffle=True,
                              seed=seed + 1, repeat=True)

    def merge(l, u):
        batch = {"image": l["image"], "label": l["label"], "unlabelled_image": u["image"]}
        if "label" in u:
            batch["unlabelled_label"] = u["label"]
        return batch

    return tf.data.Dataset.zip((labelled, unlabelled)).map(merge).prefetch(tf.data.AUTOTUNE)


@keras.saving.register_keras_serializable(package="ssl_recipes")
class FixMatchCosine(keras.optimizers.schedules.LearningRateSchedule):
    """lr * cos(7 pi k / (16 K)): FixMatch's decay, ending at ~0.2 lr rather than 0."""

    def __init__(self, learning_rate, total_steps):
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        progress = tf.minimum(tf.cast(step, tf.float32) / self.total_steps, 1.0)
        return self.learning_rate * tf.cos(7.0 * math.pi * progress / 16.0)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps}


def paper_optimizer(total_steps, learning_rate=0.03, weight_decay=5e-4):
    """SGD, Nesterov momentum 0.9, FixMatch cosine decay, and the reference code's weight decay:
    wd * |w|^2 / 2 on the kernels (not biases or BN) in the loss, so through the momentum."""
    return SGDL2(FixMatchCosine(learning_rate, total_steps), momentum=0.9, nesterov=True, l2=weight_decay,
                 l2_kernels_only=True)


class LogTestAccuracy(keras.callbacks.Callback):
    """Adds the EMA model's test accuracy to the logs every `every` epochs and at the end,
    so the history shows whether longer training would still help."""

    def __init__(self, test, every, rows=()):
        super().__init__()
        self.test, self.every = test, int(every)
        self.rows = [tuple(row) for row in rows]  # (optimizer step, test accuracy), earlier sessions' first

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.params.get("epochs"):
            accuracy = self.model.accuracy(*self.test)
            self.rows.append((int(self.model.optimizer.iterations.numpy()), accuracy))
            if logs is not None:
                logs["test_accuracy"] = accuracy


def run_fixmatch(encoder, num_classes, labelled, unlabelled_images, test=None, *, steps=1000, batch_size=64,
                 log_every=None, test_every=10, optimizer=None, strategy=None, seed=0, verbose=0,
                 heldout_unlabelled_labels=None, checkpoint_dir=None, **hyperparameters):
    """Trains FixMatch from arrays for `steps` steps; returns (model, metrics dict).

    `log_every` steps (a divisor of `steps`; default all of them) make one Keras
    epoch, i.e. one line of progress; every `test_every` such epochs (and at the
    end) the line also gives the test accuracy. Test accuracy is the EMA model's.
    With `checkpoint_dir`, every epoch is checkpointed (weights, EMA weights,
    optimizer) and a rerun resumes after the last one, skipping the batches already
    seen, so it ends where an uninterrupted run would.
    """
    log_every = int(log_every or steps)
    if steps % log_every:
        raise ValueError(f"log_every={log_every} must divide steps={steps}.")
    strategy = strategy or tf.distribute.get_strategy()
    if hyperparameters.get("distribution_alignment") and hyperparameters.get("alignment_target") is None:
        # ReMixMatch's p(y): the labelled images' class distribution (uniform for --labels_per_class).
        hyperparameters["alignment_target"] = np.bincount(np.asarray(labelled[1], np.int64), minlength=num_classes)
    with strategy.scope():
        model = FixMatch(encoder, num_classes, seed=seed,
                         label_count=hyperparameters.pop("label_count", int(len(labelled[1]))), **hyperparameters)
        model.compile(optimizer=optimizer or paper_optimizer(steps))
        checkpoint, done_epochs = resume(model, checkpoint_dir) if checkpoint_dir else (None, 0)
    ds = fixmatch_dataset(labelled[0], labelled[1], unlabelled_images, batch_size, model.mu, seed,
                          unlabelled_labels=heldout_unlabelled_labels)
    # A resumed run keeps the earlier sessions' test accuracies and wall time (the checkpoint's notes).
    earlier = checkpoint.notes if checkpoint else {}
    test_log = LogTestAccuracy(test, test_every, earlier.get("test_accuracy_by_step", ())) if test is not None \
        else None
    saver = SaveEveryEpoch(checkpoint, lambda: {"test_accuracy_by_step": test_log.rows if test_log else []}) \
        if checkpoint else None
    callbacks = [c for c in (test_log, saver) if c]
    history = model.fit(ds.skip(done_epochs * log_every), epochs=steps // log_every, initial_epoch=done_epochs,
                        steps_per_epoch=log_every, callbacks=callbacks, verbose=verbose).history
    metrics = {"protocol": {"labelled": int(len(labelled[1])), "unlabelled": int(len(unlabelled_images)),
                            "steps": steps, "batch_size": batch_size, "mu": model.mu, "seed": seed},
               **{name: float(values[-1]) for name, values in history.items() if values}}
    if saver:
        metrics["wall_time_s"] = saver.wall_time_s  # every session's, when resumed
    if test is not None:
        metrics["test_accuracy"] = model.accuracy(*test)
        metrics["test_accuracy_by_step"] = test_log.rows
    return model, metrics
