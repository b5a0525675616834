"""EmbeddingClient: embeddings from a TF-Serving-compatible server over gRPC or REST.

Works against `serving.server` and the real tensorflow_model_server alike (it uses only the
official tensorflow-serving-api messages and TF Serving's REST JSON). It reads the model's
signatures once, picks the float-image or the encoded-bytes signature from what you pass,
splits large inputs into chunks, and retries calls the server answered UNAVAILABLE
(busy batch queue, model swap in progress, server starting).

    client = EmbeddingClient("127.0.0.1:8500", "moco_resnet18_fashion_mnist")
    emb = client.embed(images)                     # (N, H, W, C) in [0, 255] -> (N, D)
    emb = client.embed([open(f, "rb").read() for f in files])   # JPEG/PNG bytes
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from serving.errors import ServingError

_HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ABORTED",
                 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_RETRYABLE = ("UNAVAILABLE",)


class EmbeddingClient:
    """Embeds images or encoded image bytes with a served encoder.

    Args:
      target: "host:port" (gRPC port for grpc, REST port for rest) or "http://host:port".
      model: served model name.
      protocol: "grpc" or "rest".
      signature: signature to call; default: `serving_default` for arrays, the signature
        taking one string input (`embed_bytes`) for bytes.
      version / version_label: pin a version; default the latest.
      timeout: seconds per call.
      max_batch: rows per call; larger inputs are split and the answers concatenated.
      retries: further attempts of a call answered UNAVAILABLE (exponential backoff).
    """

    def __init__(self, target: str, model: str, protocol: str = "grpc", signature: str | None = None,
                 version: int | None = None, version_label: str | None = None, timeout: float = 30.0,
                 max_batch: int = 64, retries: int = 3, backoff: float = 0.1):
        if protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")
        if target.startswith(("http://", "https://")):
            protocol = "rest"
        self.target, self.model, self.protocol = target, model, protocol
        self.signature, self.version, self.version_label = signature, version, version_label
        self.timeout, self.max_batch, self.retries, self.backoff = timeout, max_batch, retries, backoff
        self._signatures = None
        if protocol == "grpc":
            import grpc  # noqa: PLC0415
            from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: PLC0415

            self._grpc = grpc
            self._channel = grpc.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)])
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        else:
            url = urlsplit(target if "://" in target else f"http://{target}")
            self._host, self._port = url.hostname, url.port or 80
            self._local = threading.local()

    # -- public ----------------------------------------------------------------------------
    def embed(self, inputs) -> np.ndarray:
        """(N, D) float32 embeddings of an image array (N, H, W, C) or a list of encoded images."""
        if isinstance(inputs, (bytes, bytearray)):
            inputs = [bytes(inputs)]
        is_bytes = isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (bytes, bytearray))
        sig_name = self.signature or self._pick_signature(is_bytes)
        sig = self.signatures()[sig_name]
        if len(sig["inputs"]) != 1:
            raise ValueError(f"Signature {sig_name} takes {len(sig['inputs'])} inputs; embed() needs one.")
        (in_key,) = sig["inputs"]
        out_key = "embedding" if "embedding" in sig["outputs"] else sorted(sig["outputs"])[0]
        if is_bytes:
            array = np.array([bytes(b) for b in inputs], dtype=object)
        else:
            array = np.asarray(inputs, dtype=np.float32)
            rank = sig["inputs"][in_key]["rank"]
            if rank is not None and array.ndim == rank - 1:
                array = array[None]  # one image
        if len(array) == 0:
            raise ValueError("Nothing to embed: the input is empty.")
        parts = [self._call(sig_name, in_key, out_key, array[i:i + self.max_batch])
                 for i in range(0, len(array), self.max_batch)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def signatures(self) -> dict:
        """{signature: {"inputs": {name: {"dtype", "rank"}}, "outputs": {...}}}, read once."""
        if self._signatures is None:
            self._signatures = self._retry(self._fetch_signatures)
        return self._signatures

    def close(self):
        if self.protocol == "grpc":
            self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _pick_signature(self, is_bytes: bool) -> str:
        sigs = self.signatures()
        if not is_bytes:
            return "serving_default"
        for name in ("embed_bytes", *sorted(sigs)):
            info = sigs.get(name)
            if info and len(info["inputs"]) == 1 and next(iter(info["inputs"].values()))["dtype"] == "DT_STRING":
                return name
        raise ValueError(f"Model {self.model} has no signature taking encoded image bytes: {sorted(sigs)}")

    def _retry(self, fn, *args):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except ServingError as exc:
                if exc.code not in _RETRYABLE or attempt == self.retries:
                    raise
                time.sleep(delay)
                delay *= 2

    def _call(self, sig_name, in_key, out_key, array) -> np.ndarray:
        fn = self._grpc_predict if self.protocol == "grpc" else self._rest_predict
        return self._retry(fn, sig_name, in_key, out_key, array)

    def _spec(self, spec, sig_name=""):
        spec.name = self.model
        if sig_name:
            spec.signature_name = sig_name
        if self.version is not None:
            spec.version.value = self.version
        elif self.version_label:
            spec.version_label = self.version_label

    def _grpc_error(self, exc) -> ServingError:
        return ServingError(exc.code().name, exc.details() or str(exc))

    def _grpc_predict(self, sig_name, in_key, out_key, array):
        import tensorflow as tf  # noqa: PLC0415
        from tensorflow_serving.apis import predict_pb2  # noqa: PLC0415

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, sig_name)
        request.inputs[in_key].CopyFrom(tf.make_tensor_proto(array))
        request.output_filter.append(out_key)
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as exc:
            raise self._grpc_error(exc) from None
        return tf.make_ndarray(response.outputs[out_key])

    def _fetch_signatures(self) -> dict:
        if self.protocol == "grpc":
            from tensorflow_serving.apis import get_model_metadata_pb2  # noqa: PLC0415
            from google.protobuf import json_format  # noqa: PLC0415

            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._spec(request.model_spec)
            try:
                response = self._stub.GetModelMetadata(request, timeout=self.timeout)
            except self._grpc.RpcError as exc:
                raise self._grpc_error(exc) from None
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(sig_map)
            defs = json_format.MessageToDict(sig_map, preserving_proto_field_name=True)["signature_def"]
        else:
            defs = self._http("GET", self._path("/metadata"))["metadata"]["signature_def"]["signature_def"]
        return {name: {part: {k: _tensor_info(v) for k, v in d.get(part, {}).items()} for part in ("inputs", "outputs")}
                for name, d in defs.items() if not name.startswith("__")}

    def _path(self, suffix: str) -> str:
        path = f"/v1/models/{self.model}"
        if self.version is not None:
            path += f"/versions/{self.version}"
        elif self.version_label:
            path += f"/labels/{self.version_label}"
        return path + suffix

    def _rest_predict(self, sig_name, in_key, out_key, array):
        if array.dtype == object:
            values = [{"b64": base64.b64encode(b).decode("ascii")} for b in array]
        else:
            values = array.tolist()
        body = {"signature_name": sig_name, "inputs": {in_key: values}}
        outputs = self._http("POST", self._path(":predict"), body)["outputs"]
        return np.asarray(outputs[out_key] if isinstance(outputs, dict) else outputs, dtype=np.float32)

    def _http(self, method, path, body=None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(2):  # one silent reconnect for a keep-alive connection the server closed
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            try:
                conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
                response = conn.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if isinstance(exc, TimeoutError):
                    raise ServingError("DEADLINE_EXCEEDED", f"no answer from {self._host}:{self._port} "
                                       f"within {self.timeout}s") from None
                if attempt == 1:
                    raise ServingError("UNAVAILABLE", f"cannot reach {self._host}:{self._port}: {exc}") from None
        if response.status != 200:
            try:
                message = json.loads(payload).get("error", payload.decode(errors="replace"))
            except ValueError:
                message = payload.decode(errors="replace")
            raise ServingError(_HTTP_TO_CODE.get(response.status, "UNKNOWN"), f"HTTP {response.status}: {message}")
        return json.loads(payload)


def _tensor_info(info: dict) -> dict:
    shape = info.get("tensor_shape", {})
    rank = None if shape.get("unknown_rank") else len(shape.get("dim", []))
    return {"dtype": info.get("dtype", "DT_INVALID"), "rank": rank}


def main(argv: list[str] | None = None) -> int:
    """`zoo embed --server=HOST:PORT --model=NAME FILES...`: print or save (.npy) embeddings."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["embed"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="zoo embed", description="Embed image files with a served encoder.")
    p.add_argument("files", nargs="+", help="JPEG/PNG files")
    p.add_argument("--server", default="127.0.0.1:8500", help="host:port (gRPC) or http://host:port (REST)")
    p.add_argument("--model", required=True)
    p.add_argument("--protocol", choices=("grpc", "rest"), default="grpc")
    p.add_argument("--signature", default=None)
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output", default="", help="save the (N, D) array to this .npy file instead of printing")
    args = p.parse_args(argv)
    try:
        blobs = []
        for path in args.files:
            with open(path, "rb") as f:
                blobs.append(f.read())
        client = EmbeddingClient(args.server, args.model, protocol=args.protocol, signature=args.signature,
                                 version=args.version, timeout=args.timeout, max_batch=args.batch_size)
        with client:
            embeddings = client.embed(blobs)
    except (OSError, ValueError, ServingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output:
        np.save(args.output, embeddings)
        print(f"saved {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} to {args.output}")
    else:
        for path, row in zip(args.files, embeddings):
            print(json.dumps({"file": path, "embedding": [round(float(v), 6) for v in row]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
