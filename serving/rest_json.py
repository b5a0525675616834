"""TF Serving's REST JSON: predict's row and columnar formats, classify/regress's tf.Examples.

Row format: {"instances": [row, ...]} -> {"predictions": [...]}; a row is a value when the
signature has one input, else an object of named inputs. Columnar format: {"inputs": value
or {name: value}} -> {"outputs": ...}. Binary strings travel as {"b64": "..."}; string
outputs whose name ends in "_bytes" are returned that way too. JSON numbers take the dtype
the signature declares.

Classify/regress: {"signature_name": ..., "context": {feature: value(s)}, "examples":
[{feature: value(s)}, ...]} -> {"results": [[[label, score], ...], ...]} or {"results": [value,
...]} (the key TF Serving's server sends; its REST guide writes "result"). A feature's kind
follows its JSON values: integers and booleans int64_list, other numbers float_list, strings
and {"b64"} bytes_list.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import tensorflow as tf

from serving import errors
from serving.servable import Signature


def load_body(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.invalid_argument(f"JSON Parse error: {exc}") from exc
    if not isinstance(obj, dict):
        raise errors.invalid_argument("JSON Value is not an object: the request body must be a JSON object.")
    return obj


def request_format(obj: dict) -> str:
    """'row' or 'columnar'; INVALID_ARGUMENT when both or neither key is present."""
    has_rows, has_cols = "instances" in obj, "inputs" in obj
    if has_rows and has_cols:
        raise errors.invalid_argument("Not both of 'instances' and 'inputs' can be specified in the request.")
    if not (has_rows or has_cols):
        raise errors.invalid_argument("Missing 'inputs' or 'instances' key in the request.")
    return "row" if has_rows else "columnar"


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _strings(value, key):
    """Nested lists of str / {"b64"} -> the same nesting of bytes."""
    if isinstance(value, list):
        return [_strings(v, key) for v in value]
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as exc:
            raise errors.invalid_argument(f"Input '{key}': invalid base64 in b64 value: {exc}") from exc
    if isinstance(value, str):
        return value.encode("utf-8")
    raise errors.invalid_argument(f"Input '{key}' expects strings (or {{\"b64\": ...}}), got {type(value).__name__}")


def _shape_of(value, key):
    """Shape of a nested list, checking it is rectangular."""
    if not isinstance(value, list):
        return ()
    if not value:
        return (0,)
    inner = _shape_of(value[0], key)
    for v in value[1:]:
        if _shape_of(v, key) != inner:
            raise errors.invalid_argument(f"Input '{key}' is ragged: all rows of a tensor must have the same shape.")
    return (len(value),) + inner


def to_array(value, dtype: tf.DType, key: str) -> np.ndarray:
    """A JSON value as an array of the signature's dtype; INVALID_ARGUMENT on a mismatch."""
    if dtype == tf.string:
        nested = _strings(value, key)
        shape = _shape_of(nested, key)
        out = np.array(nested, dtype=object)
        if out.shape != shape:
            raise errors.invalid_argument(f"Input '{key}' is ragged: all rows must have the same shape.")
        return out
    try:
        raw = np.array(value)
    except ValueError as exc:
        raise errors.invalid_argument(f"Input '{key}' is ragged or malformed: {exc}") from exc
    kind = raw.dtype.kind
    if kind == "O":
        raise errors.invalid_argument(
            f"Input '{key}' must be a rectangular array of numbers for dtype {dtype.name} (ragged rows or objects found).")
    if kind in "US":
        raise errors.invalid_argument(f"Input '{key}' expects {dtype.name} numbers but got strings.")
    if dtype == tf.bool:
        if kind != "b":
            raise errors.invalid_argument(f"Input '{key}' expects booleans.")
    elif kind == "b":
        raise errors.invalid_argument(f"Input '{key}' expects {dtype.name} numbers but got booleans.")
    elif dtype.is_integer and kind == "f":
        raise errors.invalid_argument(f"Input '{key}' expects integers ({dtype.name}) but got non-integer numbers.")
    return raw.astype(dtype.as_numpy_dtype)


def parse_inputs(obj: dict, sig: Signature, fmt: str) -> dict[str, np.ndarray]:
    """The request's tensors, decoded with the signature's declared dtypes."""
    names = sorted(sig.inputs)
    if fmt == "columnar":
        value = obj["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            named = value
        elif len(names) == 1:
            named = {names[0]: value}
        else:
            raise errors.invalid_argument(
                f"'inputs' must be an object naming each of the signature's inputs {names}.")
        return {k: to_array(v, sig.inputs[k].dtype, k) if k in sig.inputs else np.asarray(0)
                for k, v in named.items()}
    rows = obj["instances"]
    if not isinstance(rows, list) or not rows:
        raise errors.invalid_argument("'instances' must be a non-empty JSON list.")
    named_rows = all(isinstance(r, dict) and not _is_b64(r) for r in rows)
    if not named_rows:
        if len(names) != 1:
            raise errors.invalid_argument(
                f"Each instance must be an object naming the signature's inputs {names}.")
        return {names[0]: to_array(rows, sig.inputs[names[0]].dtype, names[0])}
    keys = set(rows[0])
    if any(set(r) != keys for r in rows):
        raise errors.invalid_argument("All instances must name the same inputs.")
    return {k: to_array([r[k] for r in rows], sig.inputs[k].dtype, k) if k in sig.inputs else np.asarray(0)
            for k in keys}


def _json_value(key: str, array: np.ndarray):
    if array.dtype.kind in "OS":
        as_b64 = key.endswith("_bytes")

        def enc(b):
            if isinstance(b, str):
                return b
            if not as_b64:
                try:
                    return b.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(b).decode("ascii")}

        return np.vectorize(enc, otypes=[object])(array).tolist() if array.size else array.tolist()
    if array.dtype == np.float32 and array.size:
        # Each float32 at its shortest decimal that reads back to it (0.2, not float64's
        # 0.20000000298023224), as TF Serving's JSON writer does: the same values in half the bytes.
        shortest = [float(str(x)) for x in array.ravel()]  # str of a numpy float32 is its shortest decimal
        return np.array(shortest, dtype=object).reshape(array.shape).tolist()
    return array.tolist()


def format_outputs(outputs: dict[str, np.ndarray], fmt: str) -> dict:
    if fmt == "columnar":
        if len(outputs) == 1:
            ((key, value),) = outputs.items()
            return {"outputs": _json_value(key, value)}
        return {"outputs": {k: _json_value(k, v) for k, v in outputs.items()}}
    sizes = {k: (v.shape[0] if np.ndim(v) else None) for k, v in outputs.items()}
    batch = next(iter(sizes.values()), None)
    for key, size in sizes.items():
        if size is None or size != batch:
            raise errors.invalid_argument(
                f"Tensor name: {key} has inconsistent batch size: {size} expecting: {batch}; "
                "use the columnar 'inputs' format for this signature.")
    if len(outputs) == 1:
        ((key, value),) = outputs.items()
        return {"predictions": _json_value(key, value)}
    columns = {k: _json_value(k, v) for k, v in outputs.items()}
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(batch)]}


def examples_request(obj: dict, request):
    """Fills a Classification/RegressionRequest's signature_name and input from the JSON body."""
    signature_name = obj.get("signature_name")
    if signature_name is not None:
        if not isinstance(signature_name, str):
            raise errors.invalid_argument("'signature_name' must be a string.")
        request.model_spec.signature_name = signature_name
    examples = obj.get("examples")
    if examples is None:
        raise errors.invalid_argument("Missing 'examples' key in the request: a list of tf.Example objects.")
    if not isinstance(examples, list) or not examples:
        raise errors.invalid_argument("'examples' must be a non-empty JSON list of objects.")
    if "context" in obj:
        with_context = request.input.example_list_with_context
        _fill_example(obj["context"], with_context.context, "context")
        add = with_context.examples.add
    else:
        add = request.input.example_list.examples.add
    for i, example in enumerate(examples):
        _fill_example(example, add(), f"example {i}")


def _fill_example(obj, example, where: str):
    if not isinstance(obj, dict) or _is_b64(obj):
        raise errors.invalid_argument(f"The {where} must be a JSON object of features, got {type(obj).__name__}.")
    for name, value in obj.items():
        feature = example.features.feature[name]  # an empty list still names the feature
        for item in value if isinstance(value, list) else [value]:
            _add_feature_value(feature, name, item)


def _add_feature_value(feature, name: str, value):
    if isinstance(value, bool):
        kind, value = "int64_list", int(value)
    elif isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise errors.invalid_argument(f"Feature '{name}': {value} does not fit in int64.")
        kind = "int64_list"
    elif isinstance(value, float):
        if math.isfinite(value) and not math.isfinite(np.float32(value)):
            raise errors.invalid_argument(f"Feature '{name}': {value} does not fit in a float.")
        kind = "float_list"
    elif isinstance(value, str) or _is_b64(value):
        kind, value = "bytes_list", _strings(value, name)
    else:
        raise errors.invalid_argument(
            f"Feature '{name}' has an element of JSON type {type(value).__name__}; a feature holds numbers, "
            "booleans, strings or {\"b64\": ...} values, one value or a flat list.")
    current = feature.WhichOneof("kind")
    if current not in (None, kind):
        raise errors.invalid_argument(f"Feature '{name}' mixes {current} and {kind} values; a feature holds one kind.")
    getattr(feature, kind).value.append(value)


def classification_json(result) -> dict:
    return {"results": [[[c.label, c.score] for c in row.classes] for row in result.classifications]}


def regression_json(result) -> dict:
    return {"results": [r.value for r in result.regressions]}


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")
