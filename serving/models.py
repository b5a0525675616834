"""Model manager: which versions of which models are served, kept current by polling.

It reads a `ModelServerConfig` (the real proto), lists each model's base path for integer
version directories, applies the version policy (latest{n} / all / specific), and loads and
unloads SavedModels to match. The swap is availability-preserving, as TF Serving's default
policy: a new version is loaded fully (and warmed up) while the old one keeps answering, then
requests switch to it in one atomic step, and only then is the old one dropped. A version
that fails to load is recorded (state END + error) and leaves the others serving.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import errors
from serving.servable import Servable

log = logging.getLogger("serving.models")
State = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class VersionStatus:
    """What GetModelStatus reports for one version."""

    state: int = State.START
    error: errors.ServingError | None = None
    attempts: int = 0


class _Model:
    """Per-model state. `available` is replaced, never mutated, so readers need no lock."""

    def __init__(self, config):
        self.config = config
        self.status: dict[int, VersionStatus] = {}
        self.loaded: dict[int, Servable] = {}
        self.available: dict[int, Servable] = {}


def _policy_versions(config, on_disk: list[int]) -> list[int]:
    """The versions the model's version policy asks for, among those present on disk."""
    policy = config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return sorted(on_disk)
    if kind == "specific":
        return sorted(set(policy.specific.versions) & set(on_disk))
    n = max(1, policy.latest.num_versions) if kind == "latest" else 1
    return sorted(on_disk)[-n:]


def list_versions(base_path: str) -> list[int]:
    """Integer-named subdirectories of base_path (any tf.io.gfile filesystem); [] if absent."""
    try:
        names = tf.io.gfile.listdir(base_path)
    except tf.errors.NotFoundError:
        return []
    out = []
    for name in names:
        name = name.rstrip("/")
        if name.isdigit() and tf.io.gfile.isdir(f"{base_path.rstrip('/')}/{name}"):
            out.append(int(name))
    return sorted(out)


def validate_config(config: model_server_config_pb2.ModelServerConfig):
    """Raises INVALID_ARGUMENT for configs tensorflow_model_server would refuse."""
    if config.WhichOneof("config") != "model_config_list":
        raise errors.invalid_argument("ModelServerConfig must set model_config_list (custom configs unsupported).")
    names = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise errors.invalid_argument("Every model config needs a name.")
        if model.name in names:
            raise errors.invalid_argument(f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
        if not model.base_path:
            raise errors.invalid_argument(f"Model {model.name} has no base_path.")
        if model.model_platform not in ("", "tensorflow"):
            raise errors.invalid_argument(
                f"Model {model.name}: platform {model.model_platform!r} not supported (only 'tensorflow').")


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name=name, base_path=base_path, model_platform="tensorflow")
    return config


class ModelManager:
    """Loads, swaps and looks up servables.

    Args:
      config: the ModelServerConfig to serve.
      poll_wait_seconds: how often to re-list base paths (TF Serving's
        --file_system_poll_wait_seconds); 0 lists only at start and on config reload.
      max_load_retries: further attempts (one per poll) for a version that failed to load,
        e.g. because it was still being written.
      on_unload: called with each Servable after it stops being served (drops batch queues).
    """

    def __init__(self, config, poll_wait_seconds: float = 1.0, max_load_retries: int = 5,
                 on_unload: Callable[[Servable], None] | None = None, warmup: bool = True):
        validate_config(config)
        self._config = config
        self._poll_wait = poll_wait_seconds
        self._max_retries = max_load_retries
        self._on_unload = on_unload
        self._warmup = warmup
        self._models: dict[str, _Model] = {}
        self._sync = threading.Lock()  # one reconciliation at a time (poller vs reload)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self):
        """Loads what the config asks for now, then keeps polling in the background."""
        self.reload_config(self._config)
        if self._poll_wait > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        with self._sync:
            for model in self._models.values():
                self._unload_all(model)
            self._models = {}

    def _poll_loop(self):
        while not self._stop.wait(self._poll_wait):
            try:
                self.poll()
            except Exception:  # noqa: BLE001  (a poll failure must never kill the poller)
                log.exception("model poll failed")

    # -- reconciliation --------------------------------------------------------------------
    def reload_config(self, config):
        """Switches to a new ModelServerConfig; returns once its versions are loaded (or failed).

        Models no longer listed are unloaded; new ones loaded; policy/label changes apply. A
        model whose base_path changed keeps serving from the old path while the new path's
        versions load, then requests switch to them (availability-preserving, as new versions).
        """
        validate_config(config)
        with self._sync:
            models, retired = {}, []
            for model_config in config.model_config_list.config:
                current = self._models.get(model_config.name)
                if current is not None and current.config.base_path == model_config.base_path:
                    current.config = model_config
                    for st in current.status.values():
                        st.attempts = 0  # a reload grants failed versions new attempts
                    models[model_config.name] = current
                else:
                    models[model_config.name] = _Model(model_config)
                    retired += [current] if current is not None else []
            retired += [model for name, model in self._models.items() if name not in models]
            for model in models.values():  # loads while the current models keep answering
                self._reconcile(model)
            self._models, self._config = models, config  # the switch
            for model in retired:
                self._unload_all(model)

    def unavailable_models(self) -> list[str]:
        """Names of configured models with no version serving (yet)."""
        return sorted(name for name, model in self._models.items() if not model.available)

    def poll(self):
        """One pass over every model's base path (what the background poller runs)."""
        with self._sync:
            for model in list(self._models.values()):
                self._reconcile(model)

    def _reconcile(self, model: _Model):
        config = model.config
        on_disk = list_versions(config.base_path)
        if not on_disk and not model.loaded:
            log.warning("No versions of servable %s found under base path %s", config.name, config.base_path)
        desired = _policy_versions(config, on_disk)
        for version in desired:
            status = model.status.setdefault(version, VersionStatus())
            if version in model.loaded:
                continue
            if status.error is not None and status.attempts > self._max_retries:
                continue
            self._load(model, version, status)
        # Availability preserving: keep undesired versions while no desired one is available.
        desired_up = [v for v in desired if v in model.loaded]
        keep = set(desired_up) if desired_up or not desired else set(model.loaded)
        if not on_disk:
            keep = set()
        dropped = [model.loaded[v] for v in model.loaded if v not in keep]
        model.loaded = {v: s for v, s in model.loaded.items() if v in keep}
        model.available = dict(model.loaded)  # the atomic switch
        for servable in dropped:
            self._unload(model, servable)

    def _load(self, model: _Model, version: int, status: VersionStatus):
        name = model.config.name
        path = f"{model.config.base_path.rstrip('/')}/{version}"
        status.state, status.attempts = State.LOADING, status.attempts + 1
        log.info("Loading servable version {name: %s version: %d} from %s", name, version, path)
        started = time.monotonic()
        try:
            servable = Servable(name, version, path)
            if self._warmup:
                warm_up(servable)
        except Exception as exc:  # noqa: BLE001  (record, report in status, keep others serving)
            status.state, status.error = State.END, errors.from_exception(exc)
            log.error("Loading servable version {name: %s version: %d} failed: %s", name, version, status.error)
            return
        status.state, status.error = State.AVAILABLE, None
        model.loaded[version] = servable
        log.info("Successfully loaded servable version {name: %s version: %d} in %.2fs",
                 name, version, time.monotonic() - started)

    def _unload(self, model: _Model, servable: Servable):
        status = model.status.setdefault(servable.version, VersionStatus())
        status.state = State.UNLOADING
        if self._on_unload:
            self._on_unload(servable)
        status.state = State.END
        log.info("Unloaded servable version {name: %s version: %d}", servable.name, servable.version)

    def _unload_all(self, model: _Model):
        dropped, model.loaded, model.available = list(model.loaded.values()), {}, {}
        for servable in dropped:
            self._unload(model, servable)

    # -- lookups ---------------------------------------------------------------------------
    @property
    def config(self):
        return self._config

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def resolve_version(self, name: str, version: int | None = None, label: str | None = None):
        """(model, version to serve) for a request; version None means latest available."""
        model = self._models.get(name)
        if model is None:
            raise errors.not_found(f"Servable not found for request: {_request_text(name, version, label)}")
        if label:
            labels = model.config.version_labels
            if label not in labels:
                raise errors.invalid_argument(f"Unrecognized servable version label: {label}")
            version = labels[label]
        return model, version

    def servable(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable answering a request for name / version / label (NOT_FOUND if none)."""
        model, version = self.resolve_version(name, version, label)
        available = model.available
        if version is None and available:
            return available[max(available)]
        if version is not None and version in available:
            return available[version]
        raise errors.not_found(f"Servable not found for request: {_request_text(name, version, label)}")

    def status(self, name: str, version: int | None = None):
        """[(version, VersionStatus)] as GetModelStatus answers them: one version, or every
        version newest first (TF Serving's ServableStateMonitor order; it resolves no label)."""
        model = self._models.get(name)
        statuses = {} if model is None else model.status
        if version is None:
            if not statuses:
                raise errors.not_found(f"Could not find any versions of model {name}")
            return sorted(statuses.items(), reverse=True)
        if version not in statuses:
            raise errors.not_found(f"Could not find version {version} of model {name}")
        return [(version, statuses[version])]

    def wait_until_available(self, name: str, version: int | None = None, timeout: float = 60.0) -> Servable:
        """Blocks until the version (or any version) serves; for tests and start-up scripts."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                servable = self.servable(name, version)
                return servable
            except errors.ServingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _request_text(name, version, label) -> str:
    if label:
        return f"Specific({name}, label {label})"
    return f"Latest({name})" if version is None else f"Specific({name}, {version})"


def warm_up(servable: Servable):
    """Runs each numeric signature once on a zero batch of 1 so the first request is not slow."""
    for sig in servable.signatures.values():
        inputs = {}
        for key, spec in sig.inputs.items():
            if spec.dtype == tf.string or spec.shape.rank is None:
                break
            inputs[key] = np.zeros([1 if d is None else d for d in spec.shape.as_list()], spec.dtype.as_numpy_dtype)
        else:
            if inputs:
                try:
                    servable.run(sig, inputs)
                except errors.ServingError as exc:
                    log.warning("warm-up of %s/%d:%s failed: %s", servable.name, servable.version, sig.name, exc)
