"""Classify and Regress: tf.Example requests run through classify / regress signatures.

TF Serving's Classify and Regress APIs take serialized tf.Examples (optionally sharing a
context Example merged into each) and answer per-example class/score lists or values. The
logic is shared by the gRPC front end (Classify, Regress, MultiInference) and the REST one
(:classify, :regress), which differ only in how requests and results are encoded.
"""

from __future__ import annotations

import numpy as np
from tensorflow_serving.apis import classification_pb2, regression_pb2

from serving import errors
from serving.core import ServingCore, fill_model_spec, spec_args
from serving.servable import CLASSIFY_METHOD, REGRESS_METHOD


def classify(core: ServingCore, request, timeout=None) -> classification_pb2.ClassificationResponse:
    return _answer(core, request, timeout, CLASSIFY_METHOD,
                   classification_pb2.ClassificationResponse(), fill_classifications)


def regress(core: ServingCore, request, timeout=None) -> regression_pb2.RegressionResponse:
    return _answer(core, request, timeout, REGRESS_METHOD, regression_pb2.RegressionResponse(), fill_regressions)


def _answer(core, request, timeout, method, response, fill_result):
    servable, sig, outputs, n = run(core, request, method, timeout)
    fill_model_spec(response.model_spec, servable, sig.name)
    fill_result(response.result, outputs, n)
    return response


def run(core: ServingCore, request, method: str, timeout=None, servable=None):
    """(servable, signature, outputs, number of examples) of a Classification/RegressionRequest
    (on `servable` if given, else on the one its model spec resolves to)."""
    name, version, label = spec_args(request.model_spec)
    kind = method.rsplit("/", 1)[-1]
    examples = _serialized_examples(request.input)

    def inputs(sig):  # checked against the servable the request runs on (no race with a version swap)
        if sig.method_name != method:
            raise errors.invalid_argument(
                f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}")
        if len(sig.inputs) != 1:
            raise errors.invalid_argument("Expected one input Tensor.")
        return {key: np.array(examples, dtype=object) for key in sig.inputs}

    servable, sig, outputs = core.predict(name, version, label, request.model_spec.signature_name or None, inputs,
                                          timeout=timeout, servable=servable)
    return servable, sig, outputs, len(examples)


def _serialized_examples(inp) -> list[bytes]:
    kind = inp.WhichOneof("kind")
    if kind == "example_list":
        examples = list(inp.example_list.examples)
    elif kind == "example_list_with_context":
        examples = []
        for ex in inp.example_list_with_context.examples:
            merged = type(ex)()
            merged.CopyFrom(inp.example_list_with_context.context)
            merged.MergeFrom(ex)
            examples.append(merged)
    else:
        raise errors.invalid_argument("Input is empty")
    if not examples:
        raise errors.invalid_argument("Input is empty")
    return [e.SerializeToString() for e in examples]


def fill_classifications(result, outputs, n):
    classes, scores = outputs.get("classes"), outputs.get("scores")
    if classes is None and scores is None:
        raise errors.invalid_argument("Classification signature needs a 'classes' or 'scores' output")
    for i in range(n):
        row = result.classifications.add()
        k = (classes if classes is not None else scores)[i].shape[-1]
        for j in range(k):
            cls = row.classes.add()
            if classes is not None:
                value = classes[i][j]
                cls.label = value.decode() if isinstance(value, bytes) else str(value)
            if scores is not None:
                cls.score = float(scores[i][j])


def fill_regressions(result, outputs, n):
    if "outputs" not in outputs:
        raise errors.invalid_argument("Regression signature needs an 'outputs' output")
    values = np.reshape(outputs["outputs"], (n,))
    for v in values:
        result.regressions.add(value=float(v))
