"""The request path both front ends share: find the servable, check inputs, run, filter.

gRPC and REST differ only in how tensors are encoded; everything that decides an answer
(which version, which signature, validation, batching, metrics) lives here once.
"""

from __future__ import annotations

import collections

import numpy as np

from serving import errors
from serving.batching import BatchScheduler
from serving.metrics import ServerMetrics, Timer
from serving.models import ModelManager
from serving.servable import Servable, Signature


def spec_args(spec) -> tuple[str, int | None, str | None]:
    """(name, version or None, label or None) of a tensorflow.serving.ModelSpec."""
    choice = spec.WhichOneof("version_choice")
    version = spec.version.value if choice == "version" else None
    label = spec.version_label if choice == "version_label" else None
    if not spec.name:
        raise errors.invalid_argument("Missing ModelSpec name")
    return spec.name, version, label


def fill_model_spec(spec, servable: Servable, signature_name: str):
    """The ModelSpec of an answer: which version and signature ran."""
    spec.name = servable.name
    spec.version.value = servable.version
    spec.signature_name = signature_name


class ServingCore:
    def __init__(self, manager: ModelManager, batcher: BatchScheduler | None = None,
                 metrics: ServerMetrics | None = None):
        self.manager, self.batcher, self.metrics = manager, batcher, metrics or ServerMetrics()

    def predict(self, name: str, version: int | None, label: str | None, signature_name: str | None,
                inputs: dict[str, np.ndarray], output_filter=(), strict_dtypes=False, timeout=None,
                servable: Servable | None = None) -> tuple[Servable, Signature, dict[str, np.ndarray]]:
        """Runs one request. `inputs` may be a callable(signature) -> arrays, for front ends
        (REST JSON) that need the signature's dtypes to decode, resolved against the same
        servable the request then runs on (no race with a version swap). `servable`, if given,
        is the one a request with several parts (MultiInference) already resolved."""
        if servable is None:
            servable = self.manager.servable(name, version, label)
        sig = servable.signature(signature_name)
        if callable(inputs):
            inputs = inputs(sig)
        duplicates = sorted(alias for alias, n in collections.Counter(output_filter).items() if n > 1)
        if duplicates:
            raise errors.invalid_argument(f"duplicate output tensor alias: {duplicates[0]}")
        unknown = set(output_filter) - set(sig.outputs)
        if unknown:
            raise errors.invalid_argument(
                f"output tensor alias not found in signature: {', '.join(sorted(unknown))}. "
                f"Outputs expected to be in the set {{{','.join(sorted(sig.outputs))}}}.")
        checked = servable.check_inputs(sig, inputs, strict=strict_dtypes)
        if self.batcher is not None:
            outputs = self.batcher.run(servable, sig, checked, timeout=timeout)
        else:
            outputs = servable.run(sig, checked)
        if output_filter:
            outputs = {k: v for k, v in outputs.items() if k in set(output_filter)}
        return servable, sig, outputs

    def on_batch(self, servable: Servable, signature_name: str, rows: int):
        self.metrics.record_batch(servable.name, servable.version, signature_name, rows)

    def observe(self, api: str, entrypoint: str):
        """Context manager timing one request and counting it with its final status."""
        return _Observation(self.metrics, api, entrypoint)


class _Observation:
    """Collects model/version/status during a request; records them on exit."""

    def __init__(self, metrics, api, entrypoint):
        self.metrics, self.api, self.entrypoint = metrics, api, entrypoint
        self.model = self.version = None
        self.status = "OK"

    def __enter__(self):
        self._timer = Timer().__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._timer.__exit__()
        if exc is not None:
            self.status = exc.code if isinstance(exc, errors.ServingError) else "INTERNAL"
        self.metrics.record_request(self.model, self.version, self.api, self.entrypoint,
                                    self.status, self._timer.seconds)
        return False
