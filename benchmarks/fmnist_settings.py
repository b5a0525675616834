"""Settings of the Fashion-MNIST quality runs: one optimizer and one time budget for every
recipe, and each recipe's hyperparameters sized for 28-pixel images and a 128-d encoder.

Budget: the training time of MoCo's quality run (45 epochs). A recipe gets the number of
epochs that takes the same time on this machine, from the train-step throughputs measured
by `benchmarks/throughput.py --settings=fmnist` (a recipe twice as slow per image gets half
the epochs; SeLa's and DeepCluster's label steps over the training set are timed apart and
paid from the same budget). Equal time, not equal epochs, because the question our users
ask is "what do I get for an hour of CPU", and equal epochs would give CPC or DINO several
times MoCo's time.

Optimizer: MoCo's quality-run flags for all (SGD momentum 0.9, lr 0.06, weight decay 5e-4,
cosine, batch 256), as lightly's CIFAR-10 benchmark uses one SGD setting for every method,
except CPC: its scores are unnormalized dot products with no temperature, so at init they
are large (loss ~60 against log(9216) = 9.1 for chance) and SGD at lr 0.06 diverged (NaN
at step 4; with a 1-epoch warm-up the loss passed 1e5 by step 10). CPC trains with AdamW
at lr 4e-4 (loss down to ~15 after 30 steps); CPC v1 (van den Oord et al.) trained with Adam.
And Barlow Twins, which under SGD learned too slowly for this budget, trains with LARS as its
paper does; BYOL and DINO with LARS too, in LARC's clip mode as solo-learn's CIFAR configs (all
three of BYOL's numbers rose over SGD's; DINO went from below the random encoder to above it).
MAE (a ViT) trains with its paper's AdamW (see OPTIMIZER_OVERRIDES for what differs).

Hyperparameters: the papers size heads for 2048-d ImageNet features; here the encoder
gives 128-d features (resnet18_small, width 0.25), so heads shrink (solo-learn's CIFAR
configs make the same cuts: a 2048-d Barlow Twins projector, 4096 DINO prototypes), and
momentum targets start at 0.99 instead of 0.996: a target averages the online weights of
roughly the last 1/(1-m) steps, 250 at 0.996, a long lag for runs of 3,000-5,000 steps (and
the cosine schedule raises m toward 1 from there). Anything not listed is the paper's default.
"""

BACKBONE, WIDTH = "resnet18_small", 0.25
# Recipes that need another encoder family: MAE masks a ViT's patches (4-px patches: 49 tokens of 28 px).
BACKBONE_OVERRIDES = {"mae": "vit_tiny_p4"}
BUDGET_RECIPE, BUDGET_EPOCHS = "moco", 45
OPTIMIZER = {"optimizer": "sgd", "lr": "0.06", "weight_decay": "5e-4", "batch_size": "256"}  # recipes.train flags
OPTIMIZER_OVERRIDES = {
    "cpc": {"optimizer": "adamw", "lr": "4e-4"},
    # LARS with the Barlow Twins code's rate for biases and BN (0.0048 / 0.2 = 0.024 x the weights'), but
    # solo-learn's eta 0.02 (the Barlow Twins code's LARS keeps eta 0.001), lr 0.3, wd 1e-4 (the paper: 1.5e-6),
    # 2 warm-up epochs: held-out kNN 0.795 at epoch 5 against SGD's 0.634 (benchmarks/RESULTS.md).
    "barlow_twins": {"optimizer": "lars", "lr": "0.3", "weight_decay": "1e-4", "warmup_epochs": "2",
                     "optimizer_args": "eta=0.02,vector_lr_scale=0.024"},
    # LARS in LARC's clip mode, lr 1.0, wd 1e-5, eta 0.02, as solo-learn's CIFAR BYOL: 20 epochs (target
    # momentum 0.99) give test kNN 0.8351 / embedding 0.8224 / probe 0.8644 against SGD's 0.8235 / 0.8143 /
    # 0.8437 (benchmarks/RESULTS.md).
    "byol": {"optimizer": "lars", "lr": "1.0", "weight_decay": "1e-5", "warmup_epochs": "2",
             "optimizer_args": "eta=0.02,clip=true"},
    # solo-learn's CIFAR DINO optimizer: LARS (LARC clip) lr 0.3, wd 1e-6, eta 0.02. With SGD and 6 local
    # crops 13 epochs ended below the random encoder (benchmarks/RESULTS.md).
    "dino": {"optimizer": "lars", "lr": "0.3", "weight_decay": "1e-6", "warmup_epochs": "2",
             "optimizer_args": "eta=0.02,clip=true"},
    # MAE's released pretraining optimizer: AdamW, betas (0.9, 0.95), wd 0.05 (biases and LayerNorm exempt, by
    # the recipe's compile), lr 1.5e-4 x batch / 256 (1.5e-4 at 256), PyTorch's eps 1e-8, cosine to 0. Differs:
    # 2 warm-up epochs, not 40 (40 of 800 is 5%; 2 is ~5% of MAE's ~45-epoch budget).
    "mae": {"optimizer": "adamw", "lr": "1.5e-4", "weight_decay": "0.05", "warmup_epochs": "2",
            "optimizer_args": "beta_2=0.95,epsilon=1e-8"},
}
TRAIN_IMAGES = 60000  # Fashion-MNIST's training split
STEPS_PER_EPOCH = TRAIN_IMAGES // 256
# Label steps over the whole training set per epoch (SeLa's self-labelling, DeepCluster's k-means): they
# run between train steps, so they are timed apart (throughput.py's label_step_seconds) and paid from the
# same budget.
LABEL_STEPS_PER_EPOCH = {"sela": 1, "deepcluster": 1}

HPARAMS = {
    # T=0.07 (MoCo v1's) with a 16k queue: at 45 epochs the encoder's kNN and probe equal T=0.2's
    # (0.8349 / 0.8592 vs 0.8326 / 0.8599) and kNN on the 128-d embedding is 2.6 points higher
    # (0.8648 vs 0.8390): a low training temperature makes the embedding itself a kNN space.
    # Shuffle BN in 8 groups of 32 (the paper's per-GPU BN; its CIFAR demo's 8 splits): kNN 0.8446,
    # embedding 0.8703, probe 0.8627 against 2 groups' 0.8349 / 0.8648 / 0.8592 (benchmarks/RESULTS.md).
    "moco": {"queue_size": 16384, "momentum": 0.99, "temperature": 0.07, "hidden_dim": 512, "bn_splits": 8},
    # T=0.1 (SimCLR's ImageNet value) over the CIFAR 0.5: at 28 epochs kNN 0.8458 / embedding 0.8663
    # against 0.8240 / 0.8124 (benchmarks/RESULTS.md).
    "simclr": {"hidden_dim": 512, "temperature": 0.1},
    # The paper's T=0.07: the released code's CIFAR value, 0.1, ends 0.3 points lower on the encoder's kNN
    # (0.8224 against 0.8254 at 52 epochs; benchmarks/RESULTS.md).
    "npid": {},
    "cpc": {},
    # Target momentum from 0.97, the released config's value for its shortest (40-epoch) runs; our 20 epochs
    # are ~4,700 steps. Against 0.99: test kNN 0.8436 / embedding 0.8357 / probe 0.8669 against 0.8351 / 0.8224 /
    # 0.8644 (benchmarks/RESULTS.md).
    "byol": {"momentum_base": 0.97},
    "barlow_twins": {"projection_dim": 2048, "hidden_dim": 2048},
    # Two 28-px global crops and no local ones, as solo-learn's CIFAR DINO (its 2048-wide head, 4096
    # prototypes); BN in the head's hidden layers, without which a fresh ResNet's teacher is near uniform
    # (benchmarks/dino_teacher_at_init.py).
    "dino": {"output_dim": 4096, "hidden_dim": 2048, "momentum_base": 0.99, "num_local_crops": 0,
             "head_batch_norm": True},
    # The paper's pretext as is: all four rotations per image, a 512-wide head (not yet benchmarked).
    "rotnet": {},
    # 100 permutations (the paper's table 3: nearly as good as 1000) and heads sized for 7-px tiles of 128-d
    # features (not yet benchmarked).
    "jigsaw": {"num_permutations": 100, "tile_dim": 128, "hidden_dim": 1024},
    # Heads sized for 7-px tiles of 128-d features (not yet benchmarked).
    "context": {"tile_dim": 128, "hidden_dim": 512},
    # The paper's margin 10 and 1000 counts on 14-px tiles (not yet benchmarked).
    "counting": {},
    # The paper's mask ratio 0.75 and normalized-pixel target; a 2-block, 128-d decoder (not yet benchmarked).
    "mae": {},
    # As solo-learn's CIFAR SwAV: no local crops, 3000 prototypes, a 3840-row queue (15 batches of 256, the
    # paper's for batch 256); prototypes frozen for the first epoch (not yet benchmarked).
    "swav": {"num_local_crops": 0, "queue_size": 3840},
    # The paper's 10 heads and lambda 25 with 128 clusters per head (its 3,000 are for ImageNet's 1,000
    # classes; ~10x the classes here too); one label step before every epoch (not yet benchmarked).
    "sela": {"num_clusters": 128, "num_heads": 10},
    # The paper's k-means (PCA-whitening to 256, 20 Lloyd iterations) with 100 clusters, ~10x the classes as
    # its 10,000 for ImageNet's 1,000; a 512-wide head whose output is clustered before every epoch (not yet
    # benchmarked).
    "deepcluster": {"num_clusters": 100, "hidden_dim": 512},
    # The paper's feature-learning setup: random blocks (four 7-px squares, at most 1/4 of 28 px),
    # reconstruction loss only (not yet benchmarked).
    "inpainting": {},
}
# Self-supervised recipes that cannot run on Fashion-MNIST, and why.
NOT_ON_FASHION_MNIST = {"colorization": "Fashion-MNIST is grey: there is no colour to predict."}


def backbone(recipe: str) -> str:
    """The encoder `recipe` trains in the quality runs: BACKBONE, unless it needs another family."""
    return BACKBONE_OVERRIDES.get(recipe, BACKBONE)


def optimizer_flags(recipe: str) -> list:
    """recipes.train optimizer flags for `recipe`: the shared ones, overridden by name."""
    return [f"--{name}={value}" for name, value in {**OPTIMIZER, **OPTIMIZER_OVERRIDES.get(recipe, {})}.items()]


def hparams(recipe: str, epochs: int) -> dict:
    """The recipe's hyperparameters for a run of `epochs` epochs."""
    if recipe in NOT_ON_FASHION_MNIST:
        raise ValueError(f"{recipe} does not run on Fashion-MNIST: {NOT_ON_FASHION_MNIST[recipe]}")
    if recipe not in HPARAMS:
        raise ValueError(f"No Fashion-MNIST settings for recipe {recipe!r}. Known: {', '.join(sorted(HPARAMS))}.")
    values = dict(HPARAMS[recipe])
    if recipe == "dino":  # the paper warms the teacher temperature up over ~30% of training, freezes prototypes 1 epoch
        values["teacher_temperature_warmup_steps"] = int(0.3 * epochs * STEPS_PER_EPOCH)
        values["freeze_last_layer_steps"] = STEPS_PER_EPOCH
    if recipe == "swav":  # prototypes frozen for the first epoch; the queue fills from then on (paper: epoch 15)
        values["freeze_prototypes_steps"] = values["queue_start_step"] = STEPS_PER_EPOCH
    if recipe == "sela":  # one label step before every epoch
        values["num_label_updates"] = LABEL_STEPS_PER_EPOCH["sela"] * epochs
    return values


def hparams_flag(recipe: str, epochs: int) -> str:
    """`--hparams=` for recipes.train (values as JSON)."""
    import json

    return "--hparams=" + ",".join(f"{k}={json.dumps(v)}" for k, v in hparams(recipe, epochs).items())


def budget_epochs(recipe: str, images_per_sec: dict, label_step_seconds: dict | None = None) -> int:
    """Epochs that take as long as BUDGET_EPOCHS of BUDGET_RECIPE, given measured train images/sec
    and, for recipes in LABEL_STEPS_PER_EPOCH, the measured seconds of one label step."""
    for name in (recipe, BUDGET_RECIPE):
        if name not in images_per_sec:
            raise ValueError(f"No throughput measured for {name!r}: run benchmarks/throughput.py --settings=fmnist "
                             f"--recipes={name} first.")
    label_seconds = 0.0
    if recipe in LABEL_STEPS_PER_EPOCH:
        if recipe not in (label_step_seconds or {}):
            raise ValueError(f"No label-step time measured for {recipe!r}: its label steps count against the "
                             f"budget; rerun benchmarks/throughput.py --settings=fmnist --recipes={recipe}.")
        label_seconds = LABEL_STEPS_PER_EPOCH[recipe] * label_step_seconds[recipe]
    budget_seconds = BUDGET_EPOCHS * TRAIN_IMAGES / images_per_sec[BUDGET_RECIPE]
    epoch_seconds = TRAIN_IMAGES / images_per_sec[recipe] + label_seconds
    return max(1, round(budget_seconds / epoch_seconds))
