"""A run directory refuses to resume another run's flags (recipes.launch)."""

import json

import pytest

from recipes import launch

DEFINITION = {"recipe": "fixmatch", "lr": 0.03, "hparams": {"threshold": 0.95, "sizes": (1, 2)}, "seed": 0}


def _started(directory, definition=DEFINITION):
    """A run directory as training leaves it after its first checkpoint."""
    launch.check_or_record(str(directory), definition)
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / "checkpoint").write_text("")


def test_a_new_directory_records_its_definition(tmp_path):
    launch.check_or_record(str(tmp_path), DEFINITION)
    assert launch.read(str(tmp_path)) == {"recipe": "fixmatch", "lr": 0.03,
                                          "hparams": {"threshold": 0.95, "sizes": [1, 2]}, "seed": 0}


def test_the_same_definition_resumes_and_leaves_the_record_alone(tmp_path):
    _started(tmp_path)
    before = (tmp_path / launch.FILENAME).read_text()
    launch.check_or_record(str(tmp_path), dict(DEFINITION))  # tuples read back as lists: still the same run
    assert (tmp_path / launch.FILENAME).read_text() == before


def test_other_settings_are_refused_naming_each_difference(tmp_path):
    _started(tmp_path)
    other = {**DEFINITION, "lr": 0.1, "hparams": {"threshold": 0.9, "sizes": (1, 2)}, "labels_per_class": 10}
    with pytest.raises(ValueError) as error:
        launch.check_or_record(str(tmp_path), other)
    message = str(error.value)
    for said in ("lr: 0.03 then, 0.1 now", "'threshold': 0.95", "'threshold': 0.9", "labels_per_class: None then",
                 "--allow_changed_flags"):
        assert said in message
    assert "seed" not in message and "recipe:" not in message
    assert launch.read(str(tmp_path))["lr"] == 0.03  # the record is unchanged


def test_allowed_changes_are_recorded(tmp_path):
    _started(tmp_path)
    launch.check_or_record(str(tmp_path), {**DEFINITION, "lr": 0.1}, allow_changes=True)
    record = json.loads((tmp_path / launch.FILENAME).read_text())
    assert record["definition"]["lr"] == 0.1
    assert [change["changed"] for change in record["changes"]] == [{"lr": {"from": 0.03, "to": 0.1}}]
    launch.check_or_record(str(tmp_path), {**DEFINITION, "lr": 0.1})  # the new settings are now the run's


def test_a_start_that_trained_nothing_takes_the_new_settings(tmp_path):
    # e.g. the first start stopped on a misspelt dataset: the corrected command is the run.
    launch.check_or_record(str(tmp_path), {**DEFINITION, "dataset": "fashion_mnst"})
    launch.check_or_record(str(tmp_path), {**DEFINITION, "dataset": "fashion_mnist"})
    assert launch.read(str(tmp_path))["dataset"] == "fashion_mnist"
    (tmp_path / "encoder.keras").write_text("")  # a finished run counts as trained
    with pytest.raises(ValueError, match="dataset"):
        launch.check_or_record(str(tmp_path), DEFINITION)


def test_a_directory_without_a_record_reads_as_none(tmp_path):
    assert launch.read(str(tmp_path)) is None
