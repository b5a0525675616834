"""REST front end: TF Serving's /v1/models URL scheme on the standard library's HTTP server.

  GET  /v1/models/NAME[/versions/V | /labels/L]             model status
  GET  /v1/models/NAME[/versions/V | /labels/L]/metadata    signature metadata
  POST /v1/models/NAME[/versions/V | /labels/L]:predict     row or columnar JSON
  POST /v1/models/NAME[/versions/V | /labels/L]:classify    tf.Examples as JSON objects
  POST /v1/models/NAME[/versions/V | /labels/L]:regress     tf.Examples as JSON objects
  GET  <prometheus path>                                    metrics, when enabled

Errors are {"error": "..."} with the HTTP status TF Serving derives from the canonical
code. Bodies over `max_body_bytes` get 413 before being read.
"""

from __future__ import annotations

import http.server
import logging
import re
import socket
import threading
from urllib.parse import unquote

from google.protobuf import json_format
from tensorflow_serving.apis import classification_pb2, regression_pb2

from serving import errors, examples, rest_json
from serving.core import ServingCore
from serving.grpc_services import metadata_response, status_response

log = logging.getLogger("serving.rest")

_MODEL_URL = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?/?$")


def _to_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class RestServer:
    """Serves the REST API on its own threads. `port=0` picks a free port."""

    def __init__(self, core: ServingCore, host="127.0.0.1", port=8501, timeout_ms=30000,
                 max_body_bytes=64 << 20, metrics_path: str | None = None):
        self.core, self.timeout = core, (timeout_ms / 1000.0 if timeout_ms and timeout_ms > 0 else None)
        self.max_body_bytes, self.metrics_path = max_body_bytes, metrics_path
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rest", daemon=True)

    def start(self):
        self._thread.start()
        return self.port

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- routes ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, read_body) -> tuple[int, bytes, str]:
        """(HTTP status, body, content type) for one request; never raises."""
        if method == "GET" and self.metrics_path and path == self.metrics_path:
            return 200, self.core.metrics.render().encode(), "text/plain; version=0.0.4"
        match = _MODEL_URL.match(path)
        if not match:
            if path.startswith("/v1/"):
                return self._error(errors.invalid_argument(f"Malformed request: {method} {path}"))
            return self._error(errors.not_found(f"Unknown path: {method} {path}"))
        name, label = unquote(match["name"]), match["label"] and unquote(match["label"])
        version = int(match["version"]) if match["version"] else None
        verb = match["verb"]
        is_get = verb is None
        if (method == "GET") != is_get or method not in ("GET", "POST"):
            return self._error(errors.invalid_argument(f"Malformed request: {method} {path}"))
        entry = {None: "get_model_status", "predict": "predict", "classify": "classify", "regress": "regress"}
        api = "get_model_metadata" if match["metadata"] else entry[verb]
        obs = self.core.observe(api, "REST")
        obs.model = name
        try:
            with obs:
                if match["metadata"]:
                    servable = self.core.manager.servable(name, version, label)
                    obs.version = str(servable.version)
                    meta = _to_json(metadata_response(servable))
                    meta["model_spec"]["signature_name"] = ""
                    meta["metadata"]["signature_def"].pop("@type", None)
                    return 200, rest_json.dumps(meta), "application/json"
                if is_get:
                    return 200, rest_json.dumps(_to_json(status_response(self.core.manager, name, version))), \
                        "application/json"
                body = read_body()
                if verb == "predict":
                    return 200, self._predict(name, version, label, body, obs), "application/json"
                return 200, self._classify_or_regress(name, version, label, verb, body, obs), "application/json"
        except errors.ServingError as exc:
            return self._error(exc)
        except Exception as exc:  # noqa: BLE001  (a bug answers 500; the server keeps serving)
            log.exception("REST %s %s failed", method, path)
            return self._error(errors.internal(f"{type(exc).__name__}: {exc}"))

    def _predict(self, name, version, label, body, obs) -> bytes:
        obj = rest_json.load_body(body)
        fmt = rest_json.request_format(obj)
        signature_name = obj.get("signature_name")
        if signature_name is not None and not isinstance(signature_name, str):
            raise errors.invalid_argument("'signature_name' must be a string.")
        servable, _, outputs = self.core.predict(
            name, version, label, signature_name, lambda sig: rest_json.parse_inputs(obj, sig, fmt),
            timeout=self.timeout)
        obs.version = str(servable.version)
        return rest_json.dumps(rest_json.format_outputs(outputs, fmt))

    # verb -> (request message, the shared Classify/Regress call, its result as TF Serving's JSON)
    _EXAMPLE_VERBS = {
        "classify": (classification_pb2.ClassificationRequest, examples.classify, rest_json.classification_json),
        "regress": (regression_pb2.RegressionRequest, examples.regress, rest_json.regression_json),
    }

    def _classify_or_regress(self, name, version, label, verb, body, obs) -> bytes:
        request_type, run, to_json = self._EXAMPLE_VERBS[verb]
        request = request_type()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        elif label is not None:
            request.model_spec.version_label = label
        rest_json.examples_request(rest_json.load_body(body), request)
        response = run(self.core, request, self.timeout)
        obs.version = str(response.model_spec.version.value)
        return rest_json.dumps(to_json(response.result))

    @staticmethod
    def _error(exc: errors.ServingError):
        return exc.http_status, rest_json.dumps({"error": exc.message}), "application/json"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "ssl-zoo-serving"
    app: RestServer

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise errors.ServingError("INVALID_ARGUMENT", "Chunked request bodies are not supported; send Content-Length.")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise errors.invalid_argument("Invalid Content-Length header.") from None
        self._body_read = True
        if length > self.app.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as a next request
            raise _TooLarge(f"Request body of {length} bytes exceeds the limit of {self.app.max_body_bytes} bytes.")
        return self.rfile.read(length) if length else b""

    def _serve(self, method):
        path = self.path.split("?", 1)[0]
        self._body_read = False
        status, body, ctype = self.app.handle(method, path, self._read_body)
        if not self._body_read and self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True  # an unread body must not be parsed as the next request
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: two small writes meet Nagle + delayed ACK (40 ms stalls).
        self._headers_buffer.extend([b"\r\n", body])
        self.flush_headers()

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")


class _TooLarge(errors.ServingError):
    """Body over the size limit: HTTP 413 (gRPC's equivalent is RESOURCE_EXHAUSTED)."""

    def __init__(self, message):
        super().__init__("RESOURCE_EXHAUSTED", message)

    @property
    def http_status(self):
        return 413
