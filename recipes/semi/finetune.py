"""Fine-tuning: an encoder plus a linear classifier, trained on the labels there are.

The semi-supervised evaluation protocol of self-supervised work (e.g. Chen et al.
2020, SimCLR, sec. 4.2; Zhai et al. 2019, S4L): take a pretrained encoder (e.g.
`zoo.load(...)`), put a linear classifier on its pooled features and fine-tune the
whole network on a fraction of the labels (1% / 10%, or N per class,
`recipes.data.split_labelled`). It is also the supervised core of the
pseudo-labelling recipes: Pseudo-Label and Noisy Student subclass it and only
change what they train on and how noisy the student is; a fine-tuned model is a
natural first teacher for them and for FixMatch.

Batches: `{"image": uint8 [B,H,W,C], "label": int64 [B]}`, or `"target": float [B, K]`
(soft or one-hot targets) instead of "label", and optionally `"weight": float [B]`
(e.g. a smaller weight for pseudo-labelled examples, Lee 2013's alpha).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from recipes.base import Recipe, register
from recipes.checkpointing import SaveEverySteps, build_optimizer, noted_wall_time, resume
from recipes.semi.losses import soft_cross_entropy
from recipes.semi.randaugment import StrongPolicy, strong_view, weak_view

AUGMENTATIONS = ("none", "weak", "strong")


@register("finetune")
class FineTune(Recipe):
    """Encoder + (dropout) + linear classifier, trained with cross-entropy.

    Args:
      encoder: images in [0, 255] -> pooled features; kept as `.encoder`, which is
        what the zoo publishes.
      num_classes: number of classes of the linear classifier.
      augment: input noise of training batches: "none", "weak" (flip + translate,
        the standard supervised augmentation) or "strong" (the weak view, then
        RandAugment and Cutout as set by `strong_policy`).
      strong_policy: dict of `StrongPolicy` fields, used with augment="strong".
      dropout: dropout rate on the features before the classifier.
      label_smoothing: epsilon of label smoothing (0 = none).
      freeze_encoder: train the classifier only (a linear probe with augmentation).
      label_count: labelled examples behind this model (per-class count or total),
        recorded for the model card only.
      seed: augmentation seed.
    """

    def __init__(self, encoder, num_classes, augment="weak", strong_policy=None, dropout=0.0,
                 label_smoothing=0.0, freeze_encoder=False, label_count=None, seed=0, **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}.")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}.")
        self.num_classes = int(num_classes)
        self.augment = augment
        self.strong_policy = StrongPolicy.from_config(strong_policy or {})
        self.dropout = float(dropout)
        self.label_smoothing = float(label_smoothing)
        self.freeze_encoder = bool(freeze_encoder)
        self.label_count = label_count
        self.encoder.trainable = not self.freeze_encoder
        self.classifier = self._make_classifier("classifier")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self._predict_fn = None

    def _make_classifier(self, name):
        blocks = ([keras.layers.Dropout(self.dropout, seed=self.seed)] if self.dropout > 0 else [])
        classifier = keras.Sequential(blocks + [keras.layers.Dense(self.num_classes, name=f"{name}_dense")],
                                      name=name)
        classifier.build((None, self.encoder.output_shape[-1]))
        return classifier

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "augment": self.augment,
                "strong_policy": self.strong_policy.to_config(), "dropout": self.dropout,
                "label_smoothing": self.label_smoothing, "freeze_encoder": self.freeze_encoder,
                "label_count": self.label_count}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    # ---- model -----------------------------------------------------------------
    def call(self, data, training=False):
        """Class logits of `data` (images, or a batch dict with "image")."""
        images = data["image"] if isinstance(data, dict) else data
        features = self.encoder(images, training=training and not self.freeze_encoder)
        return self.classifier(features, training=training)

    def noisy_view(self, images, seed):
        """The training view of a batch: the input noise chosen by `augment`."""
        global_batch = self.global_batch(images)
        if self.augment == "weak":
            return weak_view(images, seed, global_batch)
        if self.augment == "strong":
            return strong_view(weak_view(images, seed, global_batch),
                               tf.random.experimental.stateless_fold_in(seed, 1), global_batch,
                               self.strong_policy)
        return tf.cast(images, tf.float32)

    def targets(self, data, dtype=tf.float32):
        """[B, K] training targets: "target" as given, else one-hot "label"; smoothed."""
        if "target" in data:
            targets = tf.cast(data["target"], dtype)
        else:
            targets = tf.one_hot(tf.cast(data["label"], tf.int32), self.num_classes, dtype=dtype)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return targets

    # ---- training ----------------------------------------------------------------
    def loss_terms(self, data):
        images = data["image"]
        global_batch = self.global_batch(images)
        logits = self(self.noisy_view(images, self.step_seed(1)), training=True)
        targets = self.targets(data, logits.dtype)
        losses = soft_cross_entropy(targets, logits)
        if "weight" in data:
            losses = losses * tf.cast(data["weight"], losses.dtype)
        correct = tf.equal(tf.argmax(logits, axis=-1), tf.argmax(targets, axis=-1))
        self.accuracy_tracker.update_state(tf.cast(correct, tf.float32))
        return tf.reduce_sum(losses) / global_batch, {}

    # ---- inference -----------------------------------------------------------------
    def predict_proba(self, images, batch_size=256):
        """Class probabilities [N, K] in inference mode (no noise, BN moving statistics)."""
        if self._predict_fn is None:
            self._predict_fn = tf.function(lambda x: tf.nn.softmax(self(x, training=False), axis=-1),
                                           reduce_retracing=True)
        outputs = [self._predict_fn(tf.constant(images[i:i + batch_size])).numpy()
                   for i in range(0, len(images), batch_size)]
        return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, self.num_classes), np.float32)

    def accuracy(self, images, labels, batch_size=256):
        """Top-1 accuracy on (images, labels)."""
        return float(np.mean(self.predict_proba(images, batch_size).argmax(axis=1) == np.asarray(labels)))

    @property
    def exported_encoder(self):
        """The encoder to publish to the zoo."""
        return self.encoder

    @property
    def exported_classifier(self):
        """Images -> class probabilities, published beside the encoder (TF Serving's Classify)."""
        return classifier_model(self.exported_encoder, self.classifier)


def classifier_model(encoder, head, name="classifier"):
    """A standalone `keras.Model`: images -> softmax(head(encoder(images))), in inference mode
    what `predict_proba` computes; saved as classifier.keras and served by `classify`."""
    images = keras.Input(encoder.input_shape[1:], dtype=encoder.inputs[0].dtype, name="images")
    probabilities = keras.layers.Softmax(name="probabilities")(head(encoder(images)))
    return keras.Model(images, probabilities, name=name)


def classifier_dataset(images, labels=None, targets=None, weights=None, batch_size=64, seed=0):
    """An endless, shuffled tf.data of `{"image", "label" | "target", ["weight"]}` batches.

    Batches always hold `batch_size` rows (recipes need a static batch); a set
    smaller than the batch is cycled through.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}.")
    if (labels is None) == (targets is None):
        raise ValueError("Give exactly one of labels= (int [N]) or targets= (float [N, K]).")
    columns = {"image": images}
    if labels is not None:
        columns["label"] = np.asarray(labels, np.int64)
    else:
        columns["target"] = np.asarray(targets, np.float32)
    if weights is not None:
        columns["weight"] = np.asarray(weights, np.float32)
    for name, column in columns.items():
        if len(column) != len(images):
            raise ValueError(f"{name} has {len(column)} rows but there are {len(images)} images.")
    ds = tf.data.Dataset.from_tensor_slices(columns)
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def default_optimizer(learning_rate=0.03):
    """SGD with Nesterov momentum 0.9, the optimizer of FixMatch and common fine-tuning."""
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)


def fit_classifier(model, images=None, labels=None, targets=None, weights=None, epochs=10, batch_size=64,
                   steps=None, optimizer=None, seed=0, verbose=0, dataset=None, num_examples=None,
                   checkpoint_dir=None, save_every=500):
    """Compiles (if needed) and trains `model` for `epochs` passes over the data.

    The data are arrays (`images` with `labels` or `targets`, optional `weights`),
    or a ready `dataset` of such batches with the `num_examples` an epoch passes over.
    `steps`, if given, replaces epochs by a fixed number of steps (logged as one
    epoch): useful when the sets of successive models differ a lot in size, as a
    teacher's few labels and a student's many pseudo-labels do.

    With `checkpoint_dir`, model and optimizer are saved there every `save_every`
    steps and at the end, and a rerun (same model, fresh optimizer, same data)
    restores the latest save and trains only the steps left, skipping the batches
    already seen, so it ends as an uninterrupted run does. Training is then logged
    as one epoch of all its steps.
    Returns the Keras history dict (empty if a restored run had no steps left).
    """
    if getattr(model, "optimizer", None) is None:  # not compiled yet
        model.compile(optimizer=optimizer or default_optimizer())
    if checkpoint_dir is not None and int(model.optimizer.iterations.numpy()) != 0:
        raise ValueError("fit_classifier(checkpoint_dir=...) counts steps with the optimizer: give it a "
                         "model whose optimizer has not trained yet.")
    build_optimizer(model)  # with or without checkpoints: a replicated step must not build it
    checkpoint, done = resume(model, checkpoint_dir, unit="step") if checkpoint_dir else (None, 0)
    if dataset is None:
        dataset = classifier_dataset(images, labels, targets, weights, batch_size, seed)
        num_examples = len(images)
    # A fixed number of steps is one epoch; otherwise an epoch is one pass over the examples.
    if steps is not None:
        epochs, steps_per_epoch = 1, int(steps)
    else:
        steps_per_epoch = max(1, int(num_examples) // batch_size)
    if checkpoint is None:
        return model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose).history

    total = epochs * steps_per_epoch
    if done >= total:
        return {}
    return model.fit(dataset.skip(done), epochs=1, steps_per_epoch=total - done, verbose=verbose,
                     callbacks=[SaveEverySteps(checkpoint, save_every)]).history


def last_loss(history):
    """The last logged training loss, or None when a resumed run had no steps left to log."""
    return float(history["loss"][-1]) if history.get("loss") else None


def run_finetune(encoder, num_classes, images, labels, test=None, *, epochs=30, steps=None, batch_size=64,
                 optimizer=None, strategy=None, seed=0, verbose=0, checkpoint_dir=None, **hyperparameters):
    """Fine-tunes `encoder` + a linear classifier on the labelled (images, labels).

    The labelled subset is the caller's: `recipes.data.split_labelled(labels,
    per_class=N or fraction=F)` picks it. `steps`, if given, replaces `epochs`, and
    `checkpoint_dir` makes the run resumable (see `fit_classifier`). Returns (model,
    metrics dict).
    """
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = FineTune(encoder, num_classes, seed=seed,
                         label_count=hyperparameters.pop("label_count", len(labels)), **hyperparameters)
        model.compile(optimizer=optimizer or default_optimizer())
    history = fit_classifier(model, images, labels=labels, epochs=epochs, batch_size=batch_size, steps=steps,
                             seed=seed, verbose=verbose, checkpoint_dir=checkpoint_dir)
    metrics = {"protocol": {"labelled": int(len(labels)), "epochs": epochs, "steps": steps,
                            "batch_size": batch_size, "seed": seed},
               "train_loss": last_loss(history)}
    if checkpoint_dir:  # every session's training time, not only this one's
        metrics["wall_time_s"] = noted_wall_time(checkpoint_dir)
    if test is not None:
        metrics["test_accuracy"] = model.accuracy(*test)
    return model, metrics
