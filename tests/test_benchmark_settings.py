"""The Fashion-MNIST quality runs' settings: every self-supervised recipe has them, they
build (no misspelled hyperparameter), and the time budget scales with throughput."""

import json
import os
import subprocess
import sys

import keras
import pytest

import recipes  # noqa: F401  (registers every recipe)
import recipes.train
from recipes.base import RECIPES, get_recipe_class
from recipes.semi.cli import LABEL_RECIPES
from recipes.train import build_recipe
from zoo import backbones

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
import fmnist_settings  # noqa: E402


def test_every_self_supervised_recipe_has_settings_or_a_reason_why_not():
    assert set(fmnist_settings.HPARAMS) | set(fmnist_settings.NOT_ON_FASHION_MNIST) == set(RECIPES) - set(LABEL_RECIPES)
    assert not set(fmnist_settings.HPARAMS) & set(fmnist_settings.NOT_ON_FASHION_MNIST)
    for recipe, reason in fmnist_settings.NOT_ON_FASHION_MNIST.items():
        with pytest.raises(ValueError, match="does not run on Fashion-MNIST"):
            fmnist_settings.hparams(recipe, epochs=1)
        with pytest.raises(ValueError, match="colour images"):  # and the recipe itself refuses grey images
            get_recipe_class(recipe)(backbones.build(fmnist_settings.BACKBONE, (28, 28, 1), fmnist_settings.WIDTH))


@pytest.mark.parametrize("recipe", sorted(fmnist_settings.HPARAMS))
def test_settings_build_the_recipe(recipe):
    encoder = backbones.build(fmnist_settings.backbone(recipe), (28, 28, 1), fmnist_settings.WIDTH)
    hparams = fmnist_settings.hparams(recipe, epochs=4)
    model = build_recipe(get_recipe_class(recipe), encoder, hparams, seed=0, total_steps=40, num_examples=600)
    config = model.get_config()
    for key, value in hparams.items():  # the recipe kept what the settings asked for
        assert config[key] == value, key
    assert isinstance(model, keras.Model)


def test_budget_gives_slower_recipes_fewer_epochs():
    measured = {"moco": 1000.0, "simclr": 500.0, "cpc": 170.0}
    assert fmnist_settings.budget_epochs("moco", measured) == fmnist_settings.BUDGET_EPOCHS
    assert fmnist_settings.budget_epochs("simclr", measured) == round(fmnist_settings.BUDGET_EPOCHS / 2)
    assert fmnist_settings.budget_epochs("cpc", measured) == round(fmnist_settings.BUDGET_EPOCHS * 0.17)
    with pytest.raises(ValueError, match="throughput.py --settings=fmnist --recipes=byol"):
        fmnist_settings.budget_epochs("byol", measured)
    with pytest.raises(ValueError, match="No Fashion-MNIST settings"):
        fmnist_settings.hparams("fixmatch", epochs=1)


def test_label_steps_are_paid_from_the_budget():
    """SeLa's and DeepCluster's label steps run between train steps; a recipe with one gets the
    epochs whose train steps plus label steps take MoCo's budget time, and none without a timing."""
    measured = {"moco": 1000.0, "sela": 1000.0, "deepcluster": 2000.0}
    budget_seconds = fmnist_settings.BUDGET_EPOCHS * fmnist_settings.TRAIN_IMAGES / 1000.0  # 2,700 s
    epoch_seconds = fmnist_settings.TRAIN_IMAGES / 1000.0 + 30.0  # 60 s of train steps + a 30 s label step
    assert fmnist_settings.budget_epochs("sela", measured, {"sela": 30.0}) == round(budget_seconds / epoch_seconds) == 30
    assert fmnist_settings.budget_epochs("deepcluster", measured, {"deepcluster": 0.0}) == 90
    with pytest.raises(ValueError, match="label-step time.*--recipes=sela"):
        fmnist_settings.budget_epochs("sela", measured)
    assert fmnist_settings.hparams("sela", epochs=30)["num_label_updates"] == 30  # one label step per epoch


def test_optimizer_flags_are_train_flags_given_once_with_overrides_applied():
    train_flags = recipes.train.FLAGS
    for recipe in ["moco", *fmnist_settings.OPTIMIZER_OVERRIDES]:
        names = [flag[2:].split("=", 1)[0] for flag in fmnist_settings.optimizer_flags(recipe)]
        assert len(names) == len(set(names)) and set(fmnist_settings.OPTIMIZER) <= set(names)
        assert all(n in train_flags for n in names), names
    cpc = dict(flag[2:].split("=", 1) for flag in fmnist_settings.optimizer_flags("cpc"))
    assert (cpc["optimizer"], cpc["lr"], cpc["weight_decay"]) == ("adamw", "4e-4", "5e-4")
    barlow = dict(flag[2:].split("=", 1) for flag in fmnist_settings.optimizer_flags("barlow_twins"))
    assert (barlow["optimizer"], barlow["optimizer_args"], barlow["batch_size"]) == (
        "lars", "eta=0.02,vector_lr_scale=0.024", "256")
    assert fmnist_settings.optimizer_flags("moco") == ["--optimizer=sgd", "--lr=0.06", "--weight_decay=5e-4",
                                                       "--batch_size=256"]


def test_mae_trains_with_its_papers_adamw():
    """AdamW betas (0.9, 0.95), wd 0.05, lr 1.5e-4 at batch 256, as MAE's released pretraining, and
    recipes.train builds it from the flags."""
    mae = dict(flag[2:].split("=", 1) for flag in fmnist_settings.optimizer_flags("mae"))
    assert (mae["optimizer"], mae["lr"], mae["weight_decay"], mae["batch_size"]) == ("adamw", "1.5e-4", "0.05", "256")
    assert int(mae["warmup_epochs"]) > 0
    optimizer = recipes.train.make_optimizer(mae["optimizer"], float(mae["lr"]), float(mae["weight_decay"]), 100,
                                             10, recipes.train.parse_hparams(mae["optimizer_args"]))
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.weight_decay) == (0.9, 0.95, 0.05)


SCRIPTS = sorted(name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_imports_with_its_flags(script):
    """Each script defines its flags beside the ones of the modules it imports (recipes.train's,
    say): a flag defined twice stops it at import (throughput.py's --backbone_norm, session 17)."""
    code = f"import sys; sys.path[:0] = [{BENCHMARKS!r}, {os.path.dirname(BENCHMARKS)!r}]; import {script}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_throughput_hparams_change_the_timed_recipe(tmp_path):
    """--hparams reaches the recipe timed: 3 BN groups cannot split a batch of 16."""
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "throughput.py"), "--recipes=moco",
                             "--settings=fmnist", "--hparams=bn_splits=3", "--batch_sizes=16", "--warmup=1",
                             "--steps=1", "--repeats=1", f"--out={out}"], capture_output=True, text=True,
                            timeout=300, cwd=os.path.dirname(BENCHMARKS), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert "3 BN groups" in row["error"]
