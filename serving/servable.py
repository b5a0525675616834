"""One loaded SavedModel version: its signatures, input checks and the model call.

Signatures are read generically from the SavedModel's own SignatureDefs (saved_model.pb),
so any SavedModel serves, not just zoo exports; the same SignatureDefs answer
GetModelMetadata exactly as tensorflow_model_server reports them.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from serving import errors

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"
_INIT_OP = "__saved_model_init_op"


@dataclasses.dataclass(frozen=True)
class TensorSig:
    """Declared dtype and (possibly partial) shape of one signature input or output."""

    dtype: tf.DType
    shape: tf.TensorShape

    @property
    def batched(self) -> bool:
        """True when dimension 0 is a free batch dimension (so requests may be merged)."""
        return self.shape.rank is not None and self.shape.rank >= 1 and self.shape[0] is None


@dataclasses.dataclass(frozen=True)
class Signature:
    name: str
    method_name: str
    inputs: dict[str, TensorSig]
    outputs: dict[str, TensorSig]

    @property
    def batchable(self) -> bool:
        return bool(self.inputs) and all(t.batched for t in self.inputs.values())


def _tensor_sig(info) -> TensorSig:
    shape = tf.TensorShape(None) if info.tensor_shape.unknown_rank else tf.TensorShape(
        [None if d.size < 0 else d.size for d in info.tensor_shape.dim])
    return TensorSig(tf.dtypes.as_dtype(info.dtype), shape)


def read_signature_defs(path: str):
    """The `serve` MetaGraph's SignatureDef map, straight from saved_model.pb."""
    pb = os.path.join(path, "saved_model.pb")
    if not tf.io.gfile.exists(pb):
        raise errors.not_found(f"Could not find SavedModel .pb at supplied export directory path: {path}")
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(tf.io.gfile.GFile(pb, "rb").read())
    for meta in saved.meta_graphs:
        if "serve" in meta.meta_info_def.tags:
            return meta.signature_def
    raise errors.not_found(f"SavedModel at {path} has no MetaGraph tagged 'serve'.")


class Servable:
    """A SavedModel version ready to run. Thread-safe: calls only read the loaded graph."""

    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, int(version), path
        self.signature_defs = read_signature_defs(path)
        self._loaded = tf.saved_model.load(path, tags=["serve"])
        self.signatures: dict[str, Signature] = {}
        for key, sig in self.signature_defs.items():
            if key == _INIT_OP or key not in self._loaded.signatures:
                continue
            self.signatures[key] = Signature(
                key, sig.method_name,
                {k: _tensor_sig(v) for k, v in sig.inputs.items()},
                {k: _tensor_sig(v) for k, v in sig.outputs.items()})
        self._functions = {k: self._loaded.signatures[k] for k in self.signatures}

    def signature(self, name: str | None) -> Signature:
        key = name or DEFAULT_SIGNATURE
        if key not in self.signatures:
            raise errors.failed_precondition(
                f"Serving signature key \"{key}\" not found. Available: {sorted(self.signatures)}")
        return self.signatures[key]

    def check_inputs(self, sig: Signature, inputs: dict[str, np.ndarray], strict: bool = False
                     ) -> dict[str, np.ndarray]:
        """Validates names, dtypes and shapes against the signature; returns arrays in its dtypes.

        Done before the call so a bad request is a clear INVALID_ARGUMENT, never a crash
        deep inside the graph. `strict` (gRPC, where the client states a dtype) demands the
        exact dtype as TF Serving does; REST JSON numbers are converted to the declared dtype.
        """
        missing, extra = set(sig.inputs) - set(inputs), set(inputs) - set(sig.inputs)
        if missing or extra:
            raise errors.invalid_argument(
                f"input size does not match signature: {len(inputs)}!={len(sig.inputs)} len({{"
                f"{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(sig.inputs))}}}). "
                f"Sent extra: {{{','.join(sorted(extra))}}}. Missing but required: {{{','.join(sorted(missing))}}}.")
        out = {}
        for key, spec in sig.inputs.items():
            arr = inputs[key]
            if spec.dtype == tf.string:
                if arr.dtype.kind not in "OSU":
                    raise errors.invalid_argument(
                        f"Expects arg '{key}' to be string but {arr.dtype} is provided")
            elif arr.dtype.kind in "OSU" or (arr.dtype.kind == "b" and spec.dtype != tf.bool):
                raise errors.invalid_argument(
                    f"Expects arg '{key}' to be {spec.dtype.name} but {arr.dtype} is provided")
            elif strict and arr.dtype != spec.dtype.as_numpy_dtype:
                raise errors.invalid_argument(
                    f"Expects arg '{key}' to be {spec.dtype.name} but {tf.as_dtype(arr.dtype).name} is provided")
            if not spec.shape.is_compatible_with(arr.shape):
                raise errors.invalid_argument(
                    f"Input '{key}' has shape {list(arr.shape)} but the signature expects "
                    f"{spec.shape.as_list() if spec.shape.rank is not None else 'any shape'} (None = any).")
            out[key] = arr if spec.dtype == tf.string else arr.astype(spec.dtype.as_numpy_dtype, copy=False)
        if sig.batchable:
            sizes = {a.shape[0] for a in out.values()}
            if len(sizes) > 1:
                raise errors.invalid_argument(f"Inputs disagree on batch size: {sorted(sizes)}")
        return out

    def run(self, sig: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calls the signature on already checked inputs. Errors become ServingErrors."""
        try:
            result = self._functions[sig.name](**{k: tf.constant(v) for k, v in inputs.items()})
            return {k: v.numpy() for k, v in result.items()}
        except Exception as exc:  # noqa: BLE001  (any model failure is reported, never raised raw)
            raise errors.from_exception(exc) from exc
