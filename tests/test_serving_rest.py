"""REST API of serving.server over plain HTTP: URLs, both JSON formats, b64, errors, metrics."""

import base64
import http.client
import json

import numpy as np
import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.server import ModelServer
from serving.testing import ToyEncoder, encode_png, export_example_model, export_toy_model, http_call

CONFIG = """
model_config_list {
  config {
    name: "toy" base_path: "%(base)s/toy" model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
    version_labels { key: "stable" value: 1 }
  }
  config { name: "examples" base_path: "%(base)s/examples" model_platform: "tensorflow" }
}
"""
IMAGES = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1)).astype(np.float32)
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models"))
    export_toy_model(base, "toy", 1)
    export_toy_model(base, "toy", 2)
    export_example_model(base, "examples", 1)
    config = text_format.Parse(CONFIG % {"base": base}, model_server_config_pb2.ModelServerConfig())
    srv = ModelServer(config, grpc_port=None, file_system_poll_wait_seconds=0, max_body_bytes=MAX_BODY)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def call(server):
    return lambda path, body=None, method=None: http_call(server.rest_url + path, method or ("POST" if body is not None else "GET"), body)


def expected(version, images=IMAGES):
    return ToyEncoder(seed=version).numpy_embed(images)


def test_status_urls(call):
    status, body = call("/v1/models/toy")
    assert status == 200
    assert body == {"model_version_status": [  # newest first, as TF Serving's state monitor keeps them
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert [s["version"] for s in call("/v1/models/toy/versions/2")[1]["model_version_status"]] == ["2"]
    # TF Serving's GetModelStatus reads the version only: a label lists every version.
    assert [s["version"] for s in call("/v1/models/toy/labels/stable")[1]["model_version_status"]] == ["2", "1"]


def test_metadata_urls(call):
    status, body = call("/v1/models/toy/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "toy", "version": "2", "signature_name": ""}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert sigs["serving_default"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert sigs["embed_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert call("/v1/models/toy/versions/1/metadata")[1]["model_spec"]["version"] == "1"
    assert call("/v1/models/toy/labels/stable/metadata")[1]["model_spec"]["version"] == "1"


def test_predict_row_and_columnar_formats(call):
    status, body = call("/v1/models/toy:predict", {"instances": IMAGES.tolist()})
    assert status == 200
    np.testing.assert_allclose(body["predictions"], expected(2), rtol=1e-5, atol=1e-6)
    status, body = call("/v1/models/toy:predict", {"instances": [{"images": img.tolist()} for img in IMAGES]})
    np.testing.assert_allclose(body["predictions"], expected(2), rtol=1e-5, atol=1e-6)
    status, body = call("/v1/models/toy/versions/1:predict", {"inputs": IMAGES.tolist()})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], expected(1), rtol=1e-5, atol=1e-6)
    status, body = call("/v1/models/toy/labels/stable:predict", {"inputs": {"images": IMAGES.tolist()}})
    np.testing.assert_allclose(body["outputs"], expected(1), rtol=1e-5, atol=1e-6)


def test_float32_outputs_are_written_at_their_shortest_exact_decimal():
    from serving import rest_json

    values = np.array([[0.2, 1 / 3, -5.5e-8, 123456.79]], np.float32)
    text = rest_json.dumps(rest_json.format_outputs({"embedding": values}, "row")).decode()
    assert text == '{"predictions":[[0.2,0.33333334,-5.5e-08,123456.79]]}'  # float64's 0.2 is 0.20000000298...
    np.testing.assert_array_equal(np.array(json.loads(text)["predictions"], np.float32), values)


def test_predict_b64_bytes_with_signature_name(call):
    blobs = [{"b64": base64.b64encode(encode_png(img.astype(np.uint8))).decode()} for img in IMAGES]
    status, body = call("/v1/models/toy:predict", {"signature_name": "embed_bytes", "instances": blobs})
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], expected(2), rtol=1e-5, atol=1e-6)
    status, body = call("/v1/models/toy:predict", {"signature_name": "embed_bytes", "inputs": {"image_bytes": blobs}})
    np.testing.assert_allclose(body["outputs"], expected(2), rtol=1e-5, atol=1e-6)


BAD = {
    "wrong_dtype": ({"instances": [[["x"] * 1] * 8] * 8}, 400),
    "wrong_shape": ({"instances": np.zeros((1, 4, 4, 1)).tolist()}, 400),
    "ragged": ({"instances": [[1, 2], [3]]}, 400),
    "corrupt_image": ({"signature_name": "embed_bytes", "instances": [{"b64": base64.b64encode(b"junk").decode()}]}, 400),
    "bad_base64": ({"signature_name": "embed_bytes", "instances": [{"b64": "%%%"}]}, 400),
    "both_keys": ({"instances": IMAGES.tolist(), "inputs": IMAGES.tolist()}, 400),
    "neither_key": ({"signature_name": "serving_default"}, 400),
    "unknown_signature": ({"signature_name": "nope", "instances": IMAGES.tolist()}, 400),
    "unknown_input": ({"inputs": {"pixels": IMAGES.tolist()}}, 400),
    "not_an_object": ([1, 2, 3], 400),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bodies_answer_error_json_and_server_keeps_serving(call, case):
    body, code = BAD[case]
    status, answer = call("/v1/models/toy:predict", body)
    assert status == code, answer
    assert isinstance(answer, dict) and set(answer) == {"error"} and answer["error"]
    assert call("/v1/models/toy:predict", {"instances": IMAGES.tolist()})[0] == 200


XS = np.array([[1.0, 2.0], [0.5, -1.25]])


def test_classify_and_regress_take_examples_as_json(call):
    softmax = np.exp(XS) / np.exp(XS).sum(axis=1, keepdims=True)
    status, body = call("/v1/models/examples:classify", {"examples": [{"x": list(x)} for x in XS]})
    assert status == 200, body
    assert [[label for label, _ in row] for row in body["results"]] == [["cat", "dog"]] * 2
    np.testing.assert_allclose([[score for _, score in row] for row in body["results"]], softmax, rtol=1e-6)

    status, body = call("/v1/models/examples/versions/1:regress",
                        {"signature_name": "regress", "examples": [{"x": list(x)} for x in XS]})
    assert status == 200, body
    np.testing.assert_allclose(body["results"], XS.sum(axis=1), rtol=1e-6)

    # The context's features reach every example; an example's own features win over it.
    status, body = call("/v1/models/examples:regress", {"signature_name": "regress", "context": {"x": [3.0, 0.5]},
                                                        "examples": [{}, {"x": [1.5, 1.5]}]})
    assert (status, body) == (200, {"results": [3.5, 3.0]})


BAD_EXAMPLES = {
    "no_examples": {"signature_name": "regress"},
    "empty_examples": {"examples": []},
    "example_not_object": {"examples": [[1.0, 2.0]]},
    "mixed_kinds": {"examples": [{"x": [1.0, "a"]}]},
    "nested_list": {"examples": [{"x": [[1.0, 2.0]]}]},
    "null_value": {"examples": [{"x": None}]},
    "int_feature_for_float": {"examples": [{"x": [1, 2]}]},  # int64_list: the model's ParseExample fails
    "too_big_for_int64": {"examples": [{"x": [2**64]}]},
    "predict_signature_kind": {"signature_name": "regress", "examples": [{"x": [1.0, 2.0]}]},
}


@pytest.mark.parametrize("case", sorted(BAD_EXAMPLES))
def test_bad_classify_bodies_answer_400_and_server_keeps_serving(call, case):
    status, answer = call("/v1/models/examples:classify", BAD_EXAMPLES[case])
    assert status == 400, answer
    assert set(answer) == {"error"} and answer["error"]
    assert 'File "' not in answer["error"], "the graph's Python frames are noise to a client"
    assert call("/v1/models/examples:classify", {"examples": [{"x": [0.0, 0.0]}]}) == (200, {"results": [[["cat", 0.5], ["dog", 0.5]]]})


@pytest.mark.parametrize("path, method, body, code", [
    ("/v1/models/nope", "GET", None, 404),
    ("/v1/models/nope:predict", "POST", {"instances": [1]}, 404),
    ("/v1/models/toy/versions/9", "GET", None, 404),
    ("/v1/models/toy/versions/9:predict", "POST", {"instances": IMAGES.tolist()}, 404),
    ("/v1/models/toy/labels/nope:predict", "POST", {"instances": IMAGES.tolist()}, 400),  # TF Serving: INVALID_ARGUMENT
    ("/v1/models/toy:predict", "POST", b"{not json", 400),
    ("/v1/models/toy:predict", "GET", None, 400),
    ("/v1/models/toy/versions/x", "GET", None, 400),
    ("/v1/models/toy:classify", "POST", {"examples": [{}]}, 400),  # no classify signature: INVALID_ARGUMENT
    ("/nowhere", "GET", None, 404),
])
def test_unknown_names_and_malformed_requests(call, path, method, body, code):
    status, answer = call(path, body, method)
    assert status == code, answer
    assert "error" in answer


def test_oversized_body_is_refused_and_connection_survives(server, call):
    big = {"instances": np.zeros((40, 8, 8, 1)).tolist(), "pad": "x" * MAX_BODY}
    status, answer = call("/v1/models/toy:predict", big)
    assert status == 413 and "exceeds" in answer["error"]
    # A keep-alive client that sent too much still gets clean answers on a fresh connection.
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["rest"], timeout=10)
    for _ in range(2):
        conn.request("POST", "/v1/models/toy:predict", body=json.dumps({"instances": IMAGES.tolist()}))
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    conn.close()


def test_prometheus_metrics_count_requests_and_errors(call):
    call("/v1/models/toy:predict", {"instances": IMAGES.tolist()})
    call("/v1/models/toy:predict", {"instances": "bad"})
    status, text = call("/monitoring/prometheus/metrics")
    assert status == 200
    lines = text.splitlines()
    assert "# TYPE :tensorflow:serving:request_count counter" in lines
    ok = [l for l in lines if l.startswith(':tensorflow:serving:request_count{model_name="toy",model_version="2",'
                                           'api="predict",entrypoint="REST",status="OK"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert any('status="INVALID_ARGUMENT"' in l for l in lines)
    assert any(l.startswith(":tensorflow:serving:request_latency_bucket{") for l in lines)
