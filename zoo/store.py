"""Where zoo artifacts live: a directory (local or any tf.io.gfile URI) or a read-only http(s) mirror.

Layout of a store (the same for all three kinds, so a published store directory can be
served as-is by any static web server, and `models/` is a TF Serving base directory):

    <root>/index.json                      the index (zoo.index), replaced atomically
    <root>/index.lock                      the publishers' lock
    <root>/models/<name>/<version>/        SavedModel files + encoder.keras + card.json
    <root>/tmp/<random>/                   artifacts being written, invisible to readers

Publishing writes the artifact under tmp/, verifies it, and then, holding the lock, picks
the version, renames the directory into models/ and replaces index.json. Readers never
lock: they read index.json (always complete, thanks to the rename) and trust only entries
it lists, so a crashed publisher leaves at worst an unlisted directory that `zoo verify`
reports. Removal updates the index first and deletes files second, for the same reason.

Everything read from a store is checked against the index's sha256 before use; an http
store's index is treated as untrusted input (paths are never taken from it).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import tensorflow as tf

from zoo.errors import (
    ChecksumError,
    IndexFormatError,
    LockTimeoutError,
    NotFoundError,
    ReadOnlyStoreError,
    StoreUnreachableError,
)
from zoo.index import Index, parse_ref, validate_name

INDEX_FILENAME = "index.json"
LOCK_FILENAME = "index.lock"
MODELS_DIR = "models"
STAGING_DIR = "tmp"
SAVED_MODEL_FILENAME = "saved_model.pb"  # what a model server loads a version from
DEFAULT_HOME = os.path.join("~", ".ssl_zoo")
DEFAULT_CACHE = os.path.join("~", ".cache", "ssl_zoo")
_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CHUNK = 1 << 20


# -- files and checksums --------------------------------------------------------------------


def _join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/"), *(p.strip("/") for p in parts[1:])])


def _is_local(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


def _local_path(root: str) -> str:
    return root[len("file://"):] if root.startswith("file://") else root


def safe_relpath(relpath) -> str:
    """Accepts 'variables/variables.index'-style paths only: no '..', no absolute paths."""
    parts = relpath.split("/") if isinstance(relpath, str) else [""]
    if not all(_SAFE_PART.fullmatch(part) for part in parts):
        raise IndexFormatError(f"Refusing unsafe file path {relpath!r} in a zoo index.")
    return relpath


def hash_file(path: str) -> dict:
    digest, size = hashlib.sha256(), 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def hash_tree(directory: str) -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} of every file under `directory`."""
    files = {}
    for parent, _, names in tf.io.gfile.walk(directory):
        for name in names:
            path = _join(parent, name)
            files[path[len(directory.rstrip("/")) + 1:]] = hash_file(path)
    return dict(sorted(files.items()))


def check_files(directory: str, files: dict[str, dict]) -> list[str]:
    """Problems (missing, wrong size or sha256) of `directory` against recorded checksums."""
    problems = []
    for relpath, expected in sorted(files.items()):
        path = _join(directory, safe_relpath(relpath))
        if not tf.io.gfile.exists(path):
            problems.append(f"{relpath}: missing")
            continue
        actual = hash_file(path)
        if actual["sha256"] != expected["sha256"] or actual["size"] != expected["size"]:
            problems.append(
                f"{relpath}: sha256 {actual['sha256'][:12]}... ({actual['size']} bytes), "
                f"index says {expected['sha256'][:12]}... ({expected['size']} bytes)"
            )
    return problems


def verified_dir(st, name: str, number: int, entry: dict, outcome: str, skip=()) -> str:
    """The store's directory of `name:number`, once its files (but `skip`) match the index.

    Raises ChecksumError saying `outcome` ("nothing was loaded", "not served"). An http store
    checks what it fetches itself (it re-downloads a damaged cache), so it is not hashed twice.
    """
    directory = st.fetch(name, number, entry)
    if st.fetch_verifies:
        return directory
    problems = check_files(directory, {k: v for k, v in entry["files"].items() if k not in skip})
    if problems:
        raise ChecksumError(f"{name}:{number} in {st.root} failed verification, {outcome}: "
                            f"{'; '.join(problems)}. Republish it or `zoo rm` it.")
    return directory


def read_verified(directory: str, relpath: str, expected: dict) -> bytes:
    """The file's bytes, only if they hash to `expected` (read once: what is checked is what is used)."""
    path = _join(directory, safe_relpath(relpath))
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except tf.errors.NotFoundError:
        raise ChecksumError(f"{path} is missing; run `zoo verify` and republish the model.") from None
    if hashlib.sha256(data).hexdigest() != expected["sha256"] or len(data) != expected["size"]:
        raise ChecksumError(
            f"{path} does not match the sha256 recorded in the zoo index: the file is corrupted or was "
            "modified. Nothing was loaded. Run `zoo verify` to list damaged entries, then republish or "
            "`zoo rm` them (for an http store, delete the cached copy and retry)."
        )
    return data


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _move_dir(src: str, dst: str) -> None:
    """Renames when the filesystem can (local: atomic); else copies file by file, then deletes.

    Object stores (gs://, s3://) cannot rename a directory, so the copy puts saved_model.pb
    last: a model server polling the store finds no loadable version until every file is in.
    """
    if _is_local(src) and _is_local(dst):
        os.rename(_local_path(src), _local_path(dst))
        return
    files = [_join(parent, name)[len(src.rstrip("/")) + 1:] for parent, _, names in tf.io.gfile.walk(src)
             for name in names]
    for relpath in sorted(files, key=lambda relpath: relpath == SAVED_MODEL_FILENAME):
        tf.io.gfile.makedirs(os.path.dirname(_join(dst, relpath)))
        tf.io.gfile.copy(_join(src, relpath), _join(dst, relpath))
    tf.io.gfile.rmtree(src)


# -- locks ----------------------------------------------------------------------------------


class _FlockLock:
    """fcntl lock on a local file: the kernel releases it when the holder dies, so never stale."""

    def __init__(self, path: str, timeout: float):
        self.path, self.timeout, self.fd = path, timeout, None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise LockTimeoutError(
                        f"Waited {self.timeout:.0f}s for the zoo index lock {self.path}; another publish or "
                        "rm is still running. Retry when it has finished."
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _LockFile:
    """Advisory lock file for remote gfile stores, which offer no exclusive create.

    Create-if-absent, then read back our token; a lock older than `stale_after` seconds is
    taken to belong to a dead publisher and broken. Good enough for occasional publishing;
    heavy concurrent publishing should go to a local store.
    """

    def __init__(self, path: str, timeout: float, stale_after: float = 600.0):
        self.path, self.timeout, self.stale_after = path, timeout, stale_after
        self.token = uuid.uuid4().hex

    def _holder(self):
        try:
            with tf.io.gfile.GFile(self.path, "r") as f:
                return json.loads(f.read())
        except (tf.errors.NotFoundError, ValueError):
            return None

    def __enter__(self):
        deadline = time.monotonic() + self.timeout
        while True:
            holder = self._holder()
            if holder is None or time.time() - holder.get("time", 0) > self.stale_after:
                with tf.io.gfile.GFile(self.path, "w") as f:
                    f.write(json.dumps({"token": self.token, "time": time.time(), "host": socket.gethostname()}))
                time.sleep(0.5)  # let a racing writer's file land before reading back
                if (self._holder() or {}).get("token") == self.token:
                    return self
            if time.monotonic() > deadline:
                raise LockTimeoutError(
                    f"Waited {self.timeout:.0f}s for the zoo index lock {self.path}. If no publish is running, "
                    f"delete that file and retry."
                )
            time.sleep(0.5)

    def __exit__(self, *exc):
        if (self._holder() or {}).get("token") == self.token:
            tf.io.gfile.remove(self.path)


# -- stores ---------------------------------------------------------------------------------


def entry_path(name: str, version: int) -> str:
    return f"{MODELS_DIR}/{validate_name(name)}/{int(version)}"


class DirStore:
    """A store in a directory: a local path, `file://...` or any `tf.io.gfile` URI (gs://, s3://, ...)."""

    read_only = False
    fetch_verifies = False  # its files are read in place: `verified_dir` hashes them

    def __init__(self, root: str):
        if _is_local(root):
            root = os.path.abspath(os.path.expanduser(_local_path(root))) if not root.startswith("file://") else root
        self.root = root.rstrip("/") or "/"

    def __repr__(self):
        return f"DirStore({self.root!r})"

    def _unreachable(self, error: Exception) -> StoreUnreachableError:
        return StoreUnreachableError(
            f"Could not read zoo store {self.root} ({type(error).__name__}: {error}). Check the path, your "
            "credentials and network, or use a local store (set ZOO_HOME or pass store=)."
        )

    def read_index(self) -> Index:
        path = _join(self.root, INDEX_FILENAME)
        try:
            if not tf.io.gfile.exists(path):
                return Index(where=self.root)
            with tf.io.gfile.GFile(path, "rb") as f:
                text = f.read()
        except tf.errors.OpError as e:
            raise self._unreachable(e) from e
        return Index.from_json(text, where=self.root)

    def fetch(self, name: str, version: int, entry: dict) -> str:
        """Directory holding the entry's files, readable with tf.io.gfile."""
        return _join(self.root, entry_path(name, version))

    def base_path(self, name: str, versions=None) -> str:
        """`<root>/models/<name>`: TF Serving's model base path, version directories inside."""
        return _join(self.root, MODELS_DIR, validate_name(name))

    def require_writable(self) -> None:
        pass

    def lock(self, timeout: float = 300.0):
        tf.io.gfile.makedirs(self.root)
        path = _join(self.root, LOCK_FILENAME)
        return _FlockLock(_local_path(path), timeout) if _is_local(self.root) else _LockFile(path, timeout)

    def new_staging_dir(self) -> str:
        """A fresh (not yet created) path on the store's filesystem, so the final move can be a rename."""
        tf.io.gfile.makedirs(_join(self.root, STAGING_DIR))
        return _join(self.root, STAGING_DIR, uuid.uuid4().hex)

    def commit(self, staged: str, name: str, entry: dict, labels=()) -> int:
        """Moves a verified staged artifact into the store as the next version of `name`.

        `entry` holds "files" (checksums), "created_at" and "summary"; the path and the
        version are assigned here, under the lock.
        """
        with self.lock():
            index = self.read_index()
            version = index.next_version(name, taken=version_dirs(self.base_path(name)))
            final = _join(self.root, entry_path(name, version))
            tf.io.gfile.makedirs(self.base_path(name))
            _move_dir(staged, final)
            try:
                problems = check_files(final, entry["files"])
                if problems:
                    raise ChecksumError(f"Publishing {name}:{version} failed, files changed while moving: {problems}")
                index.add(name, version, {**entry, "path": entry_path(name, version)}, labels)
                _atomic_write(_join(self.root, INDEX_FILENAME), index.to_json())
            except BaseException:
                tf.io.gfile.rmtree(final)
                raise
        return version

    def set_label(self, name: str, label: str, version: int) -> None:
        with self.lock():
            index = self.read_index()
            index.set_label(name, label, version)
            _atomic_write(_join(self.root, INDEX_FILENAME), index.to_json())

    def remove(self, name: str, version: int | str | None = None) -> list[int]:
        """Removes a version (or every version) from the index first, then deletes its files."""
        with self.lock():
            index = self.read_index()
            removed = index.remove(name, version)
            _atomic_write(_join(self.root, INDEX_FILENAME), index.to_json())
        for number in removed:
            path = _join(self.root, entry_path(name, number))
            if tf.io.gfile.exists(path):
                tf.io.gfile.rmtree(path)
        if version is None and tf.io.gfile.exists(self.base_path(name)) and not tf.io.gfile.listdir(self.base_path(name)):
            tf.io.gfile.rmtree(self.base_path(name))
        return removed

    def leftovers(self, index: Index) -> list[str]:
        """Directories no index entry owns: staging dirs and versions of crashed or failed publishes."""
        found = []
        staging = _join(self.root, STAGING_DIR)
        if tf.io.gfile.isdir(staging):
            found += [_join(staging, d) for d in tf.io.gfile.listdir(staging)]
        models = _join(self.root, MODELS_DIR)
        if tf.io.gfile.isdir(models):
            for name in tf.io.gfile.listdir(models):
                name = name.rstrip("/")
                known = set(index.versions(name)) if name in index.names() else set()
                found += [_join(models, name, str(v)) for v in version_dirs(_join(models, name)) if v not in known]
        return sorted(found)


def version_dirs(base: str) -> list[int]:
    """Integer version subdirectories of a TF Serving model base path, ascending."""
    if not tf.io.gfile.isdir(base):
        return []
    names = (d.rstrip("/") for d in tf.io.gfile.listdir(base))
    return sorted(int(n) for n in names if re.fullmatch(r"[0-9]+", n))


class HttpStore:
    """A read-only store served over http(s) (e.g. a store directory behind any web server).

    Files are downloaded once into a local cache that mirrors the store layout (including
    the last index fetched), verified against the index, and re-verified on every load.
    """

    read_only = True
    fetch_verifies = True  # `fetch` hashes the cache and each download against the index

    def __init__(self, url: str, cache_dir: str | None = None, timeout: float = 30.0):
        self.root = url.rstrip("/")
        cache_root = os.path.expanduser(cache_dir or os.environ.get("ZOO_CACHE") or DEFAULT_CACHE)
        key = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self.cache = os.path.join(cache_root, "http", key)
        self.timeout = timeout

    def __repr__(self):
        return f"HttpStore({self.root!r}, cache={self.cache!r})"

    def _open(self, url: str):
        host = urllib.parse.urlsplit(url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        return urllib.request.build_opener(*handlers).open(url, timeout=self.timeout)

    def _get(self, relpath: str) -> bytes:
        url = f"{self.root}/{urllib.parse.quote(relpath)}"
        try:
            with self._open(url) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise NotFoundError(f"{url} not found (HTTP 404); is {self.root} a zoo store?") from None
            raise StoreUnreachableError(f"Zoo store {self.root} answered HTTP {e.code} for {url}.") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # IncompleteRead: cut short
            reason = getattr(e, "reason", e)
            cached = os.path.join(self.cache, INDEX_FILENAME)
            offline = (
                f" Models downloaded before are cached: pass store={self.cache!r} to use them offline."
                if os.path.exists(cached)
                else ""
            )
            raise StoreUnreachableError(
                f"Could not reach zoo store {self.root} ({reason}). Check the URL, that the server is up and "
                f"that you are online, or use a local store (set ZOO_HOME or pass store=).{offline}"
            ) from None

    def read_index(self) -> Index:
        text = self._get(INDEX_FILENAME)
        index = Index.from_json(text, where=self.root)
        os.makedirs(self.cache, exist_ok=True)
        _atomic_write(os.path.join(self.cache, INDEX_FILENAME), text.decode())
        return index

    def fetch(self, name: str, version: int, entry: dict) -> str:
        """Downloads whatever of the entry is not in the cache yet; returns the cached directory.

        A version new to the cache is downloaded beside it and moved in whole, so a model
        server polling the cached base path never sees (and fails to load) half a version.
        """
        relative = entry_path(name, version)
        local = os.path.join(self.cache, relative)
        if os.path.isdir(local):  # mended in place, file by file
            self._download(relative, local, entry)
            return local
        staging = os.path.join(self.cache, STAGING_DIR, uuid.uuid4().hex)
        try:
            self._download(relative, staging, entry)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                os.rename(staging, local)
            except OSError:  # another process cached this version meanwhile: check and mend that copy
                if not os.path.isdir(local):
                    raise
                self._download(relative, local, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return local

    def _download(self, relative: str, local: str, entry: dict) -> None:
        """Puts every file of the entry into `local`, downloading those missing or damaged there."""
        for relpath, expected in sorted(entry["files"].items()):
            path = os.path.join(local, safe_relpath(relpath))
            if os.path.exists(path) and hash_file(path) == expected:
                continue
            data = self._get(f"{relative}/{relpath}")
            if hashlib.sha256(data).hexdigest() != expected["sha256"] or len(data) != expected["size"]:
                raise ChecksumError(
                    f"{self.root}/{relative}/{relpath} does not match the sha256 in the store's index; the "
                    "remote store is corrupted or changed during the download. Nothing was cached."
                )
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)

    def base_path(self, name: str, versions=None) -> str:
        """Downloads the given versions (default: all) and returns the cached TF Serving base path.

        Cached versions the remote index no longer lists are deleted, so a server pointed at
        the cache does not keep serving them.
        """
        index = self.read_index()
        wanted = index.versions(name) if versions is None else [index.resolve(name, v)[0] for v in versions]
        for number in wanted:
            self.fetch(name, number, index.resolve(name, number)[1])
        base = os.path.join(self.cache, MODELS_DIR, validate_name(name))
        for number in version_dirs(base):
            if number not in index.versions(name):
                tf.io.gfile.rmtree(os.path.join(base, str(number)))
        return base

    def _refuse(self, *args, **kwargs):
        raise ReadOnlyStoreError(
            f"{self.root} is an http(s) store, which is read-only. Publish to a directory or gs:// store "
            "and serve that directory over http instead."
        )

    require_writable = lock = new_staging_dir = commit = set_label = remove = _refuse

    def leftovers(self, index: Index) -> list[str]:
        return []


def default_root() -> str:
    return os.environ.get("ZOO_HOME") or os.path.expanduser(DEFAULT_HOME)


def open_store(store=None):
    """A store from `store` (a store object, path or URI), else $ZOO_HOME, else ~/.ssl_zoo."""
    if isinstance(store, (DirStore, HttpStore)):
        return store
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a path, a URI or a store object, got {type(store).__name__}.")
    root = os.fspath(store) if store is not None else default_root()
    if not root:
        raise ValueError("Empty zoo store location; pass a directory or URI, or unset ZOO_HOME.")
    if root.startswith(("http://", "https://")):
        return HttpStore(root)
    return DirStore(root)


def serving_base_path(ref: str, store=None, versions=None) -> str:
    """TF Serving base path (`<base>/<name>`, integer version dirs inside) of a published model.

    `ref` is "name" or "name:version". For http stores the versions (default all, or the
    one in `ref`) are downloaded and verified into the local cache first; a directory
    store's base path always holds every published version (choose with the server's
    version policy), and the version(s) to serve are verified in place. This is what
    `serving` puts into its model config for `zoo serve NAME`.
    """
    name, version = parse_ref(ref)
    st = open_store(store)
    index = st.read_index()
    index.versions(name)  # raises NotFoundError with suggestions for unknown names
    wanted = [version] if version is not None else versions
    base = st.base_path(name, wanted)
    # The server reads these files itself: each version it may serve (the named ones, else the
    # latest, what its default policy loads) is checked against the index first.
    # An http store's base_path has just fetched, so verified, them.
    if not st.fetch_verifies:
        for number in wanted if wanted is not None else [None]:
            verified_dir(st, name, *index.resolve(name, number), outcome="not served")
    return base
