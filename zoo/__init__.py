"""Self-supervised model zoo: load, publish and serve encoders by name."""

from zoo import backbones  # registers the custom layers so `.keras` files load as-is  # noqa: F401
