"""Noisy Student: self-training where a noised student learns from an un-noised teacher.

Xie, Luong, Hovy & Le 2020, "Self-training with Noisy Student improves ImageNet
classification" (CVPR).

Algorithm 1 of the paper: (1) train a teacher on the labelled images; (2) the
teacher, *without* noise, labels the unlabelled images (soft or hard labels); (3)
train an equal-or-larger student on labelled + pseudo-labelled images *with* noise;
(4) make the student the teacher and go back to (2). The noise is what makes the
student better than its teacher rather than a copy of it: it must give the
teacher's answer on a harder, perturbed input, so it learns invariances the
teacher never had, and in a larger model it has the capacity to.

Noise used here, as in the paper:
  * input noise: RandAugment (N=2, magnitude 0.9 of our operations' full strength by
    default, our choice: the paper's M=27 is on its code's scale where 10 is
    AutoAugment's maximum; its 32-px SVHN script's 5 is milder than our 0.5 would be, as
    its translations are 2 px and its enhance operations do nothing at that level). No
    Cutout by default, where the released code has Cutout among its operations and its
    32-px path adds a 16x16 Cutout after RandAugment;
  * model noise: dropout (0.5 in the paper) on the features before the classifier,
    and stochastic depth in the encoder's residual blocks (survival probability 0.8
    at the last block, decaying linearly; `zoo.backbones.with_stochastic_depth`). Ours
    drops every block's residual branch, the downsampling blocks' too (which then keep
    only their strided projection); EfficientNet's code drops identity-skip blocks only.
    The published encoder is a plain copy: noise is a training-time device only.

Data filtering and balancing (sec. 2): keep images whose top class probability is
>= 0.3; with `per_class=K` (off by default, since K depends on the data), per class the
K most confident, duplicating images of classes with fewer than K (`fill_classes=True`),
as the paper's code balances. Soft labels are the default (the
paper finds them at least as good as hard ones, better out of domain). The student
is trained from scratch by default (`init_from_teacher=False`).

The first teacher is trained without the student's noise by default
(`teacher_noise=False`; our choice: the paper's "unnoised teacher" is about generating
pseudo-labels, and its ImageNet teachers trained with RandAugment): plain cross-entropy on
the labelled images, here with the standard flip-and-translate augmentation and
neither dropout nor stochastic depth, i.e. the supervised-only model. With few labels
the noised teacher underfits: on Fashion-MNIST with 600 labels it ended 2.7 points
below that model after the same 1,000 steps (benchmarks/RESULTS.md). `teacher_noise=True` trains it
under the student's noise. As in the paper's
code (`unlabel_ratio`), every student batch holds labelled and pseudo-labelled
images at a fixed ratio (`unlabelled_ratio`, 3 by default: a quarter of each batch
is labelled); `unlabelled_ratio=None` pools them into one shuffled set instead.

Where the released code differs beyond that: it adds r x B pseudo-labelled images to a
labelled batch of B and sums the two means (labelled + r x pseudo-labelled), where our
batch is B in all and the loss its mean, so at the same learning rate its gradient per
step is (1 + r) times ours; it labels and evaluates with an EMA of the weights (decay
0.9999), ours with the weights themselves; and it trains with RMSProp (lr 0.016 x B/256,
warm-up, decay 0.97 every 2.4 epochs, weight decay 1e-5), ours with `FineTune`'s SGD.
"""

from __future__ import annotations

from recipes.base import register
from recipes.semi.finetune import FineTune
from recipes.semi.self_training import SelfTrainingMixin, run_self_training
from zoo.backbones import with_stochastic_depth

# The paper's N=2; the magnitude and leaving out Cutout are ours (see the module docstring).
STUDENT_STRONG_POLICY = {"num_ops": 2, "magnitude": 0.9, "cutout": 0.0}
# The first teacher without the student's noise (our default, see the module docstring): a supervised-only model.
UNNOISED_TEACHER = {"augment": "weak", "dropout": 0.0, "stochastic_depth": 0.0}


@register("noisy_student")
class NoisyStudent(SelfTrainingMixin, FineTune):
    """Noisy Student; a `FineTune` classifier trained with input and model noise.

    Args:
      encoder, num_classes, label_smoothing, freeze_encoder, label_count, seed: as in
        `FineTune`.
      augment: input noise, "strong" (RandAugment) by default.
      strong_policy: RandAugment settings (default: N=2, M=0.9, no Cutout).
      dropout: model noise before the classifier (0.5 in the paper).
      stochastic_depth: drop rate of the last residual block (0.2 = the paper's
        survival probability 0.8; earlier blocks less); 0 turns it off.
      teacher_noise: train the first teacher (round 0) with the noise above too; by
        default it trains with `UNNOISED_TEACHER` settings (a supervised-only model).
      rounds, threshold, hard_labels, per_class, fill_classes, unlabelled_weight,
        init_from_teacher, student_steps_scale, unlabelled_ratio: as in
        `SelfTrainingMixin`; defaults are the paper's (threshold 0.3, soft labels,
        balancing when per_class is set, fresh student, separate labelled rows in
        every batch). The value 3 is ours (the paper's code takes it as a flag); on
        Fashion-MNIST with 100 labels it measured no better than one shuffled set
        once students train long enough (benchmarks/RESULTS.md, "Few labels").
    """

    def __init__(self, encoder, num_classes, rounds=3, threshold=0.3, hard_labels=False, per_class=None,
                 fill_classes=True, unlabelled_weight=1.0, init_from_teacher=False, augment="strong",
                 strong_policy=None, dropout=0.5, stochastic_depth=0.2, student_steps_scale=1.0,
                 unlabelled_ratio=3.0, teacher_noise=False, **kwargs):
        self.teacher_noise = bool(teacher_noise)
        self.stochastic_depth = float(stochastic_depth)
        if self.stochastic_depth > 0:
            encoder = with_stochastic_depth(encoder, self.stochastic_depth, seed=kwargs.get("seed", 0))
        super().__init__(encoder, num_classes, augment=augment, dropout=dropout,
                         strong_policy=STUDENT_STRONG_POLICY if strong_policy is None else strong_policy,
                         **kwargs)
        self._init_self_training(rounds, threshold, hard_labels, per_class, fill_classes,
                                 unlabelled_weight, init_from_teacher, student_steps_scale, unlabelled_ratio)

    def get_config(self):
        return {**super().get_config(), **self.self_training_config(), "stochastic_depth": self.stochastic_depth,
                "teacher_noise": self.teacher_noise}

    @property
    def exported_encoder(self):
        """The trained encoder without its stochastic-depth layers (same weights and outputs)."""
        return with_stochastic_depth(self.encoder, 0.0) if self.stochastic_depth > 0 else self.encoder


def first_teacher_settings(hyperparameters: dict) -> dict:
    """`NoisyStudent` arguments of the round-0 teacher: un-noised unless teacher_noise=True."""
    return dict(hyperparameters) if hyperparameters.get("teacher_noise") else {**hyperparameters, **UNNOISED_TEACHER}


def run_noisy_student(encoder_fn, num_classes, labelled, unlabelled_images, test=None, *,
                      student_encoder_fn=None, epochs=20, steps=None, batch_size=64, heldout_unlabelled_labels=None,
                      teacher=None, optimizer_fn=None, strategy=None, seed=0, verbose=0, checkpoint_dir=None,
                      **hyperparameters):
    """Noisy Student from the arrays; see `run_self_training`.

    Args:
      encoder_fn: `() -> keras.Model` for the initial teacher.
      student_encoder_fn: `() -> keras.Model` for every student (equal or larger
        capacity; default `encoder_fn`).
      hyperparameters: `NoisyStudent` arguments (rounds, threshold, per_class, ...);
        without teacher_noise=True, the round-0 teacher gets `UNNOISED_TEACHER` instead.

    Returns:
      (final student, per-round metrics).
    """
    hyperparameters.setdefault("label_count", int(len(labelled[1])))

    def make_model(round_index):
        if round_index == 0:
            return NoisyStudent(encoder_fn(), num_classes, seed=seed, **first_teacher_settings(hyperparameters))
        return NoisyStudent((student_encoder_fn or encoder_fn)(), num_classes, seed=seed + round_index,
                            **hyperparameters)

    return run_self_training(make_model, labelled, unlabelled_images, test, epochs=epochs, steps=steps,
                             batch_size=batch_size, heldout_unlabelled_labels=heldout_unlabelled_labels,
                             teacher=teacher, optimizer_fn=optimizer_fn, strategy=strategy, seed=seed,
                             verbose=verbose, checkpoint_dir=checkpoint_dir)
