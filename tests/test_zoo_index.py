"""Names, references and the index schema: pure rules, no files."""

import json

import pytest

from zoo import errors
from zoo.index import SCHEMA_VERSION, Index, parse_ref, validate_label, validate_name
from zoo.store import safe_relpath

HOSTILE_NAMES = [
    "", "../x", "..", "a/b", "/abs", "Upper", "MOCO", "a b", "a-b", "a.b", "a:b", "name\n", " x", "x\x00",
    "mоco",  # Cyrillic 'о'
    "ｍoco",  # fullwidth 'm'
    "moco٣",  # Arabic-Indic digit
    "a" * 101, None, 3, b"moco",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_rejected(name):
    with pytest.raises(errors.InvalidNameError, match="name"):
        validate_name(name)


def test_rejection_suggests_a_valid_name():
    with pytest.raises(errors.InvalidNameError, match="'moco_resnet18'"):
        validate_name("MoCo-ResNet18")


@pytest.mark.parametrize("name", ["moco", "moco_resnet18_fashion_mnist", "a", "_", "0", "x" * 100])
def test_valid_names(name):
    assert validate_name(name) == name


def test_refs():
    assert parse_ref("moco") == ("moco", None)
    assert parse_ref("moco:3") == ("moco", 3)
    assert parse_ref("moco:latest") == ("moco", None)
    assert parse_ref("moco:stable") == ("moco", "stable")
    assert parse_ref("moco", 2) == ("moco", 2)
    for bad in ["moco:", "moco:0", "moco:-1", "../x:1", "moco:Stable", "moco:1:2"]:
        with pytest.raises(errors.InvalidNameError):
            parse_ref(bad)
    with pytest.raises(errors.InvalidNameError, match="not both"):
        parse_ref("moco:1", 2)
    for bad in ["latest", "1", "", "Stable", "a-b"]:
        with pytest.raises(errors.InvalidNameError):
            validate_label(bad)


def _entry(n):
    return {"path": f"models/m/{n}", "files": {}, "summary": {}}


def test_resolve_versions_labels_and_removal():
    index = Index()
    for n in (1, 2, 3):
        index.add("m", n, _entry(n), labels=["stable"] if n == 2 else ())
    assert index.resolve("m")[0] == 3
    assert index.resolve("m", "stable")[0] == 2
    assert index.next_version("m", taken=[7]) == 8
    with pytest.raises(errors.NotFoundError, match=r"versions: \[1, 2, 3\]"):
        index.resolve("m", 9)
    with pytest.raises(errors.NotFoundError, match="no version label 'canary'"):
        index.resolve("m", "canary")
    assert index.remove("m", "stable") == [2]
    assert index.remove("m", 3) == [3] and index.next_version("m") == 4  # never reused
    assert index.labels("m") == {}
    again = Index.from_json(index.to_json())
    assert again.versions("m") == [1] and json.loads(again.to_json())["schema_version"] == SCHEMA_VERSION


def test_unknown_name_suggests_close_names():
    index = Index(where="/some/store")
    index.add("moco_resnet18_fashion_mnist", 1, _entry(1))
    index.add("simclr_resnet18_fashion_mnist", 1, _entry(1))
    with pytest.raises(errors.NotFoundError, match="Did you mean 'moco_resnet18_fashion_mnist'") as e:
        index.resolve("moco_resnet18_fashion_mnst")
    assert "/some/store" in str(e.value) and "zoo list" in str(e.value)


def test_schema_is_checked():
    with pytest.raises(errors.IndexFormatError, match="Upgrade"):
        Index({"schema_version": SCHEMA_VERSION + 1, "models": {}})
    with pytest.raises(errors.IndexFormatError):
        Index.from_json("{not json")
    with pytest.raises(errors.IndexFormatError):
        Index({"models": {}})
    with pytest.raises(errors.InvalidNameError):
        Index({"schema_version": 1, "models": {"../evil": {"versions": {}}}})


@pytest.mark.parametrize("path", ["../x", "a/../../b", "/etc/passwd", "", "a//b", ".hidden", "a\\b"])
def test_untrusted_file_paths_are_refused(path):
    with pytest.raises(errors.IndexFormatError):
        safe_relpath(path)
    assert safe_relpath("variables/variables.data-00000-of-00001")
