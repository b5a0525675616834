"""Recipes: how encoders are trained without (or with few) labels.

Importing `recipes` registers every recipe by name (see `recipes.base.RECIPES`).
"""

from recipes import base  # noqa: F401
from recipes.contrastive import moco  # noqa: F401
