"""Recipes: how encoders are trained without (or with few) labels.

Importing `recipes` imports every module of the method subpackages, and with them
their `@register(...)` decorators, so each recipe is available by name in
`recipes.base.RECIPES` (and to `python -m recipes.train --recipe=NAME`).
"""

import importlib
import pkgutil

from recipes import base  # noqa: F401

_METHOD_PACKAGES = ("contrastive", "distillation", "pretext", "clustering", "masked", "semi")

for _package in _METHOD_PACKAGES:
    _module = importlib.import_module(f"recipes.{_package}")
    for _info in pkgutil.iter_modules(_module.__path__):
        importlib.import_module(f"recipes.{_package}.{_info.name}")
