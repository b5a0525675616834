"""benchmarks/label_efficiency.py keeps one record per finished run, so its table outlives
the run directories (a new machine, a cleaned runs/) without retraining anything."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SUP100_FLAGS = ("--dataset=fashion_mnist --backbone=resnet18_small --width=0.25 --batch_size=64 --verbose=2 "
                "--recipe=finetune --epochs=10 --steps_per_epoch=100 --labels_per_class=10 --seed=0")


def _fake_run(run_dir, accuracy, flags=SUP100_FLAGS):
    os.makedirs(run_dir)
    metrics = {"classifier": {"accuracy": accuracy, "protocol": {"labelled": 100}}, "knn": {"accuracy": 0.5}}
    run = {"wall_time_s": 60.0, "git_commit": "abcdef0123456789",
           "command": f"python -m recipes.train --model_dir={run_dir} {flags}"}
    for name, content in (("metrics.json", metrics), ("run.json", run)):
        with open(os.path.join(run_dir, name), "w") as f:
            json.dump(content, f)


def _tabulate(tmp_path, returncode=0):
    result = subprocess.run(
        [sys.executable, "benchmarks/label_efficiency.py", "--recorded_only", "--splits=100",
         f"--run_root={tmp_path / 'runs'}", f"--records={tmp_path / 'records'}", f"--out={tmp_path / 'table'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == returncode, result.stderr[-2000:]
    if returncode:
        return result.stderr
    with open(tmp_path / "table.json") as f:
        return {r["method"]: r for r in json.load(f)["results"]}


def test_records_stand_in_for_run_directories_that_are_gone(tmp_path):
    _fake_run(tmp_path / "runs" / "sup100", 0.6543)
    table = _tabulate(tmp_path)
    assert list(table) == ["supervised only"]  # every other row is neither on disk nor recorded: skipped
    assert table["supervised only"]["test_accuracy"] == 0.6543
    assert table["supervised only"]["git_commit"] == "abcdef0123456789"
    assert "| 100 | supervised only | 0.6543 | +0.0 | 1.0 min | abcdef0 |" in (tmp_path / "table.md").read_text()

    shutil.rmtree(tmp_path / "runs" / "sup100")
    assert _tabulate(tmp_path)["supervised only"]["test_accuracy"] == 0.6543  # from the record

    record_path = tmp_path / "records" / "sup100.json"
    record = json.loads(record_path.read_text())
    record["command"] += " --epochs=99"  # recorded under other flags: not this row's result
    record_path.write_text(json.dumps(record))
    assert _tabulate(tmp_path) == {}


def test_a_run_directory_from_other_flags_is_refused_not_tabulated(tmp_path):
    _fake_run(tmp_path / "runs" / "sup100", 0.7, flags=SUP100_FLAGS.replace("--epochs=10", "--epochs=20"))
    error = _tabulate(tmp_path, returncode=1)
    assert "--epochs=20" in error and "--epochs=10" in error
    assert not (tmp_path / "records" / "sup100.json").exists()
