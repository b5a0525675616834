"""The model server: gRPC + REST front ends over one model manager, and `zoo serve`.

`ModelServer` runs in-process (tests, notebooks, the main job); `main(argv)` is the CLI with
tensorflow_model_server's flag names. When the real `tensorflow_model_server` binary is on
PATH, `main` runs it with the same flags instead (`--backend=python` keeps ours).

    python -m serving.server --model_name=enc --model_base_path=/models/enc
    python -m serving.server --model_config_file=models.config --enable_batching
    zoo serve moco_resnet18_fashion_mnist             # published zoo entries, by name
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import grpc
from google.protobuf import text_format

from serving import errors, protos
from serving.batching import BatchingOptions, BatchScheduler
from serving.core import ServingCore
from serving.grpc_services import add_services
from serving.metrics import DEFAULT_PATH, ServerMetrics
from serving.models import ModelManager, single_model_config
from serving.rest import RestServer

log = logging.getLogger("serving.server")
_MAX_MESSAGE_BYTES = 64 << 20


class ModelServer:
    """TF-Serving-compatible server, startable in-process.

    Args:
      model_config: a ModelServerConfig (or use model_name + model_base_path).
      host: interface to bind; loopback unless you mean to expose the server.
      grpc_port / rest_port: 0 picks a free port; None disables that front end.
      batching: BatchingOptions to merge concurrent requests, or None.
      file_system_poll_wait_seconds: how often base paths are re-listed for new versions.
      model_config_file / model_config_file_poll_wait_seconds: re-read this file
        periodically and apply changes (0 = read once).
      monitoring: a MonitoringConfig; default serves Prometheus text at
        /monitoring/prometheus/metrics.
      rest_api_timeout_in_ms: REST requests waiting longer for a batch answer 504.
      max_body_bytes: REST bodies and gRPC messages above this are refused (413 /
        RESOURCE_EXHAUSTED).

    Example:
      >>> server = ModelServer(model_name="enc", model_base_path="/tmp/models/enc")
      >>> ports = server.start()        # {"grpc": 43121, "rest": 39817}
      >>> server.stop()
    """

    def __init__(self, model_config=None, *, model_name=None, model_base_path=None, host="127.0.0.1",
                 grpc_port: int | None = 0, rest_port: int | None = 0, batching: BatchingOptions | None = None,
                 file_system_poll_wait_seconds: float = 1.0, model_config_file: str | None = None,
                 model_config_file_poll_wait_seconds: float = 0.0, monitoring=None,
                 rest_api_timeout_in_ms: int = 30000, max_body_bytes: int = _MAX_MESSAGE_BYTES,
                 grpc_workers: int = 16):
        if model_config is None:
            if model_config_file:
                model_config = protos.parse_text_file(model_config_file, protos.ModelServerConfig)
            elif model_name and model_base_path:
                model_config = single_model_config(model_name, model_base_path)
            else:
                raise ValueError("Give a model config, a model_config_file, or model_name and model_base_path.")
        self.host = host
        self._ports = {"grpc": grpc_port, "rest": rest_port}
        self._config_file = model_config_file
        self._config_poll = model_config_file_poll_wait_seconds
        self._rest_timeout_ms = rest_api_timeout_in_ms
        self._max_body = max_body_bytes
        self._grpc_workers = grpc_workers
        self.metrics_path = _metrics_path(monitoring)
        self.metrics = ServerMetrics()
        self._batching = batching
        self.batcher = None
        self.manager = ModelManager(model_config, poll_wait_seconds=file_system_poll_wait_seconds,
                                    on_unload=self._forget)
        self.core = ServingCore(self.manager, None, self.metrics)
        self._grpc = self._rest = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._config_thread = None
        self.ports: dict[str, int] = {}

    def _forget(self, servable):
        if self.batcher is not None:
            self.batcher.remove(servable)

    def start(self) -> dict[str, int]:
        """Loads the models, opens the ports; returns {"grpc": port, "rest": port} as bound."""
        if self._batching is not None:
            self.batcher = BatchScheduler(self._batching, on_batch=self.core.on_batch)
            self.core.batcher = self.batcher
        self.manager.start()
        try:
            if self._ports["grpc"] is not None:
                opts = [("grpc.max_receive_message_length", self._max_body),
                        ("grpc.max_send_message_length", self._max_body), ("grpc.so_reuseport", 0)]
                self._grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(self._grpc_workers), options=opts)
                add_services(self._grpc, self.core)
                port = self._grpc.add_insecure_port(f"{_host_port(self.host, self._ports['grpc'])}")
                if port == 0:
                    raise OSError(f"cannot bind gRPC port {self._ports['grpc']} on {self.host}")
                self._grpc.start()
                self.ports["grpc"] = port
                log.info("Running gRPC ModelServer at %s:%d ...", self.host, port)
            if self._ports["rest"] is not None:
                self._rest = RestServer(self.core, self.host, self._ports["rest"], self._rest_timeout_ms,
                                        self._max_body, self.metrics_path)
                self.ports["rest"] = self._rest.start()
                log.info("Exporting HTTP/REST API at:%s:%d ...", self.host, self.ports["rest"])
        except Exception:
            self.stop()
            raise
        if self._config_file and self._config_poll > 0:
            self._config_thread = threading.Thread(target=self._watch_config, name="config-poller", daemon=True)
            self._config_thread.start()
        return dict(self.ports)

    def stop(self, grace: float = 1.0):
        """Closes the ports (letting in-flight requests finish for `grace` s) and unloads models."""
        self._stop.set()
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.stop()
        self.manager.stop()
        self._stopped.set()

    def wait(self):
        """Blocks until stop() (or a signal handler calling it) has finished."""
        self._stopped.wait()

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.ports['rest']}"

    def _watch_config(self):
        current = self.manager.config
        while not self._stop.wait(self._config_poll):
            try:
                config = protos.parse_text_file(self._config_file, protos.ModelServerConfig)
                if config != current:
                    log.info("Model config file %s changed; reloading", self._config_file)
                    self.manager.reload_config(config)
                    current = config
            except (ValueError, errors.ServingError) as exc:
                log.error("Keeping the current models; new config is not usable: %s", exc)


def _host_port(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _metrics_path(monitoring) -> str | None:
    if monitoring is None:
        return DEFAULT_PATH
    prom = monitoring.prometheus_config
    if not prom.enable:
        return None
    return prom.path or DEFAULT_PATH


# -- command line ------------------------------------------------------------------------------
def _bool(text) -> bool:
    value = str(text).lower()
    if value in ("1", "true", "yes", "y"):
        return True
    if value in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo serve", description="Serve SavedModels over TensorFlow Serving's gRPC and REST APIs.")
    p.add_argument("names", nargs="*", help="published zoo entries to serve (instead of a model flag)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0 = any free port)")
    p.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0 = any free port, -1 = off)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--model_name", default="default")
    p.add_argument("--model_base_path", default="")
    p.add_argument("--model_config_file", default="")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0)
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1)
    p.add_argument("--enable_batching", type=_bool, nargs="?", const=True, default=False)
    p.add_argument("--batching_parameters_file", default="")
    p.add_argument("--monitoring_config_file", default="")
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=30000)
    p.add_argument("--max_body_bytes", type=int, default=_MAX_MESSAGE_BYTES,
                   help="largest REST body / gRPC message accepted (not a tensorflow_model_server flag)")
    p.add_argument("--backend", choices=("auto", "python", "binary"), default="auto",
                   help="auto: run tensorflow_model_server when on PATH, else this server")
    return p


_OWN_FLAGS = ("host", "max_body_bytes", "backend", "names")


def _zoo_config(names: list[str]):
    """A ModelServerConfig serving published zoo entries ("name" or "name:version") from the zoo store."""
    import zoo  # noqa: PLC0415  (serving needs zoo only for `zoo serve NAME`)
    from zoo.index import parse_ref  # noqa: PLC0415

    config = protos.ModelServerConfig()
    for ref in names:
        try:
            name, version = parse_ref(ref)
            if isinstance(version, str):  # a label: served as the version it names now
                version = zoo.info(ref)["version"]
                ref = f"{name}:{version}"
            base_path = str(zoo.serving_base_path(ref))
        except Exception as exc:  # noqa: BLE001  (unknown name, unreachable store: one clear message)
            raise ValueError(f"cannot serve zoo entry {ref!r}: {exc}") from exc
        model = config.model_config_list.config.add(name=name, base_path=base_path, model_platform="tensorflow")
        if isinstance(version, int):
            model.model_version_policy.specific.versions.append(version)
    return config


def _server_from_args(args) -> ModelServer:
    if args.names:
        config = _zoo_config(args.names)
    elif args.model_config_file:
        config = protos.parse_text_file(args.model_config_file, protos.ModelServerConfig)
    elif args.model_base_path:
        config = single_model_config(args.model_name, args.model_base_path)
    else:
        raise ValueError("Nothing to serve: give zoo entry names, --model_config_file, or --model_base_path.")
    batching = None
    if args.enable_batching:
        params = (protos.parse_text_file(args.batching_parameters_file, protos.BatchingParameters)
                  if args.batching_parameters_file else protos.BatchingParameters())
        batching = BatchingOptions.from_proto(params)
    monitoring = (protos.parse_text_file(args.monitoring_config_file, protos.MonitoringConfig)
                  if args.monitoring_config_file else None)
    return ModelServer(
        config, host=args.host, grpc_port=args.port, rest_port=None if args.rest_api_port < 0 else args.rest_api_port,
        batching=batching, file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        model_config_file=args.model_config_file or None,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        monitoring=monitoring, rest_api_timeout_in_ms=args.rest_api_timeout_in_ms, max_body_bytes=args.max_body_bytes)


def _run_binary(binary: str, args) -> int:
    """Runs tensorflow_model_server with our flags (zoo names become a models.config file)."""
    argv = [binary]
    tmp = None
    if args.names:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".config", delete=False)
        tmp.write(text_format.MessageToString(_zoo_config(args.names)))
        tmp.close()
        args.model_config_file = tmp.name
    if args.rest_api_port == 0:
        raise ValueError("--rest_api_port=0 (any free port) means REST off to tensorflow_model_server; "
                         "give a port, -1 for off, or --backend=python.")
    if args.host not in ("0.0.0.0", "::"):
        log.warning("tensorflow_model_server has no --host: it listens on every interface, not only %s "
                    "(--backend=python binds %s alone).", args.host, args.host)
    for key, value in vars(args).items():
        if key in _OWN_FLAGS or value in ("", None) or (key in ("model_name",) and not args.model_base_path):
            continue
        if key == "rest_api_port" and value < 0:
            value = 0  # the binary's "off"
        if isinstance(value, float):  # the binary's poll waits are whole seconds (int32 flags)
            if not value.is_integer():
                raise ValueError(f"--{key}={value}: tensorflow_model_server takes whole seconds.")
            value = int(value)
        argv.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    log.info("Running %s", " ".join(argv))
    try:
        return subprocess.call(argv)
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


def main(argv: list[str] | None = None) -> int:
    """`zoo serve` / `python -m serving.server`: serve until SIGINT/SIGTERM; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s")
    binary = shutil.which("tensorflow_model_server")
    if args.backend == "binary" or (args.backend == "auto" and binary):
        if not binary:
            print("error: --backend=binary but tensorflow_model_server is not on PATH", file=sys.stderr)
            return 2
        try:
            return _run_binary(binary, args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        server = _server_from_args(args)
        ports = server.start()
    except (ValueError, OSError, errors.ServingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"serving {', '.join(server.manager.model_names())} on {args.host}: "
          f"gRPC {ports.get('grpc')}, REST {ports.get('rest', 'off')}", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, lambda *_: threading.Thread(target=server.stop).start())
        except ValueError:  # not the main thread: the caller handles signals
            pass
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
