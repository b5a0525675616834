"""The zoo index: names -> versions -> artifact location, checksums and card summary.

One JSON file per store, `index.json`, schema-versioned so that an older library refuses a
newer index instead of misreading it:

    {"schema_version": 1,
     "last_versions": {"moco_resnet18": 1},     # high-water marks: numbers are never reused
     "models": {"moco_resnet18": {
         "labels": {"stable": 1},
         "versions": {"1": {"path": "models/moco_resnet18/1",
                            "files": {"encoder.keras": {"sha256": "...", "size": 123}, ...},
                            "created_at": "2025-...Z",
                            "summary": {"recipe": "moco", ...}}}}}}

This module is pure data: it never touches files, so every rule here (names, labels,
version resolution) is checked without a store. Names double as path components and
TF Serving model names, hence the strict `[a-z0-9_]+`.
"""

from __future__ import annotations

import copy
import difflib
import json
import re

from zoo.errors import IndexFormatError, InvalidNameError, NotFoundError

SCHEMA_VERSION = 1
MAX_NAME_LENGTH = 100
_NAME = re.compile(r"[a-z0-9_]+")
_LABEL = re.compile(r"[a-z][a-z0-9_]*")
LATEST = "latest"


def validate_name(name) -> str:
    """Returns `name` if it is a valid model name, else raises `InvalidNameError`."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"A model name must be a non-empty string, got {name!r}.")
    # `re` with `str` patterns would match non-ASCII digits for \d; the explicit ASCII class
    # plus isascii() keep out look-alikes such as Cyrillic 'а' or fullwidth digits.
    if not name.isascii() or not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"Invalid model name {name!r}: use 1-{MAX_NAME_LENGTH} lowercase ASCII letters, digits "
            f"and underscores (e.g. {_suggest_valid(name)!r})."
        )
    return name


def _suggest_valid(name) -> str:
    text = str(name).lower().encode("ascii", "ignore").decode()
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", text)).strip("_")[:MAX_NAME_LENGTH] or "my_model"


def validate_label(label) -> str:
    """Version labels name a version ("stable", "canary"); they cannot look like a number."""
    if (
        not isinstance(label, str)
        or not label.isascii()
        or not _LABEL.fullmatch(label)
        or label == LATEST
        or len(label) > MAX_NAME_LENGTH
    ):
        raise InvalidNameError(
            f"Invalid version label {label!r}: use lowercase ASCII letters, digits and underscores, "
            f"starting with a letter; {LATEST!r} is reserved."
        )
    return label


def parse_ref(ref, version=None) -> tuple[str, int | str | None]:
    """Splits "name[:version|label]" into (name, version); `version` overrides nothing silently.

    Returns the version as an int, a label string, or None for the latest version.
    """
    if not isinstance(ref, str):
        raise InvalidNameError(f"A model reference must be a string like 'name' or 'name:2', got {ref!r}.")
    name, sep, tail = ref.partition(":")
    if sep:
        if version is not None:
            raise InvalidNameError(f"Give the version either in {ref!r} or as version=, not both.")
        if not tail:
            raise InvalidNameError(f"Empty version in {ref!r}; use 'name', 'name:2' or 'name:stable'.")
        version = tail
    validate_name(name)
    if version is None or version == LATEST:
        return name, None
    if isinstance(version, bool):
        raise InvalidNameError(f"Invalid version {version!r}.")
    if isinstance(version, int) or (isinstance(version, str) and version.isascii() and version.isdigit()):
        number = int(version)
        if number < 1:
            raise InvalidNameError(f"Versions are positive integers, got {version!r}.")
        return name, number
    return name, validate_label(version)


def _check_schema(data) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise IndexFormatError("index.json is not a zoo index (no 'models' mapping); the store may be damaged.")
    schema = data.get("schema_version")
    if not isinstance(schema, int):
        raise IndexFormatError("index.json has no integer 'schema_version'; the store may be damaged.")
    if schema > SCHEMA_VERSION:
        raise IndexFormatError(
            f"index.json has schema version {schema}, this ssl-zoo understands up to {SCHEMA_VERSION}. "
            "Upgrade ssl-zoo to read this store."
        )
    last = data.get("last_versions", {})
    if not isinstance(last, dict) or not all(type(v) is int for v in last.values()):
        raise IndexFormatError("index.json 'last_versions' must map names to integers; the store may be damaged.")
    for name, model in data["models"].items():
        validate_name(name)
        if not isinstance(model, dict) or not isinstance(model.get("versions"), dict):
            raise IndexFormatError(f"index.json entry {name!r} has no 'versions' mapping.")
        for version, entry in model["versions"].items():
            if not (version.isascii() and version.isdigit()) or not isinstance(entry, dict) or "path" not in entry or "files" not in entry:
                raise IndexFormatError(f"index.json entry {name}:{version} is malformed.")
    return data


class Index:
    """An in-memory zoo index; stores load it from and save it to `index.json`."""

    def __init__(self, data: dict | None = None, where: str = "this zoo store"):
        self.where = where
        self.data = _check_schema(copy.deepcopy(data)) if data is not None else {
            "schema_version": SCHEMA_VERSION,
            "models": {},
        }

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "this zoo store") -> "Index":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise IndexFormatError(f"The index of {where} is not valid JSON ({e}); the store may be damaged.") from e
        return cls(data, where=where)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True) + "\n"

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.data["models"])

    def versions(self, name: str) -> list[int]:
        return sorted(int(v) for v in self._model(name)["versions"])

    def labels(self, name: str) -> dict[str, int]:
        return dict(self._model(name).get("labels", {}))

    def _model(self, name: str) -> dict:
        validate_name(name)
        try:
            return self.data["models"][name]
        except KeyError:
            raise NotFoundError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"No model named {name!r} in zoo store {self.where}.{hint} Run `zoo list` to see the published models."

    def resolve(self, name: str, version: int | str | None = None) -> tuple[int, dict]:
        """(version number, entry) for a version number, a label, or None (= latest)."""
        model = self._model(name)
        if not model["versions"]:
            raise NotFoundError(f"Model {name!r} has no versions left; publish one or remove the name.")
        if version is None:
            number = max(int(v) for v in model["versions"])
        elif isinstance(version, str):
            labels = model.get("labels", {})
            if version not in labels:
                known = ", ".join(sorted(labels)) or "none"
                raise NotFoundError(f"Model {name!r} has no version label {version!r} (labels: {known}).")
            number = labels[version]
        else:
            number = int(version)
        entry = model["versions"].get(str(number))
        if entry is None:
            raise NotFoundError(
                f"Model {name!r} has no version {number}; versions: {self.versions(name)}. "
                "Omit the version to get the latest."
            )
        return number, entry

    # -- writing ---------------------------------------------------------------------------

    def next_version(self, name: str, taken=()) -> int:
        """One more than any version ever published under `name` or in `taken` (dirs on disk).

        Numbers are never reused, even after `rm`, so "name:3" always means the same bytes.
        """
        model = self.data["models"].get(validate_name(name), {"versions": {}})
        last = self.data.get("last_versions", {}).get(name, 0)
        return max([last, *(int(v) for v in model["versions"]), *taken]) + 1

    def add(self, name: str, version: int, entry: dict, labels=()) -> None:
        model = self.data["models"].setdefault(validate_name(name), {"labels": {}, "versions": {}})
        if str(version) in model["versions"]:
            raise ValueError(f"{name}:{version} is already in the index.")
        model["versions"][str(version)] = entry
        last_versions = self.data.setdefault("last_versions", {})
        last_versions[name] = max(last_versions.get(name, 0), int(version))
        for label in labels:
            model.setdefault("labels", {})[validate_label(label)] = version

    def set_label(self, name: str, label: str, version: int) -> None:
        number, _ = self.resolve(name, int(version))
        self._model(name).setdefault("labels", {})[validate_label(label)] = number

    def remove(self, name: str, version: int | str | None = None) -> list[int]:
        """Removes one version (or, with version=None, the whole name); returns the removed versions."""
        model = self._model(name)
        if version is None:
            del self.data["models"][name]
            return sorted(int(v) for v in model["versions"])
        number, _ = self.resolve(name, version)
        del model["versions"][str(number)]
        model["labels"] = {k: v for k, v in model.get("labels", {}).items() if v != number}
        if not model["versions"]:
            del self.data["models"][name]
        return [number]
