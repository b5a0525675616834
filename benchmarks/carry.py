"""Carries unfinished runs from one machine to the next through git.

A working session here lasts 180 minutes and the next one starts on a new machine that has
only what main holds: `runs/` is gone. Some runs need several sessions (FixMatch's
20,000-step schedule is ~7.5 h on 2 cores). `save` packs what a run needs to resume, its
latest checkpoint, launch record, outputs and log, into carry/<name>.tar.gz, to be
committed; `restore` unpacks every archive back where it came from, and the run's unchanged
command then resumes it. Delete an archive once its run has finished and its numbers are
recorded.

    python benchmarks/carry.py save runs/label_efficiency/fixmatch_dino100_da_20k \\
        runs/label_efficiency/fixmatch_dino100_da_20k.log
    python benchmarks/carry.py restore

Left out: TensorBoard logs (`logs/`), checkpoints older than the latest one, and the files
and directories named by --skip (by default `embedding.keras`, which the zoo does not
publish by default and which is large for wide heads: DINO's is ~24 MB; a finished run
whose encoder is all that is needed can add `checkpoints`).
"""

from __future__ import annotations

import os
import re
import sys
import tarfile

from absl import app, flags

flags.DEFINE_string("carry_dir", "carry", "Where the archives go (relative to the repository root).")
flags.DEFINE_list("skip", ["embedding.keras"], "File and directory names never packed (e.g. add checkpoints "
                  "for a finished run whose outputs are all that is needed).")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = re.compile(r"^ckpt-(\d+)\.")


def archive_name(path: str) -> str:
    """carry/<name>.tar.gz for a run directory or file: its path with / as __."""
    if "__" in path:
        raise ValueError(f"{path} contains '__', which would not restore to the same path; rename it.")
    return os.path.normpath(path).replace(os.sep, "__") + ".tar.gz"


def members(path: str, skip=("embedding.keras",)) -> list[str]:
    """The files under `path` (relative to the current directory) that a resume needs."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is neither a run directory nor a file; nothing was packed.")
    files = []
    for directory, subdirs, names in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if d != "logs" and d not in skip)
        numbers = [int(m.group(1)) for m in map(CHECKPOINT.match, names) if m]
        latest = max(numbers, default=None)
        for name in sorted(names):
            match = CHECKPOINT.match(name)
            if name in skip or (match and int(match.group(1)) != latest):
                continue
            files.append(os.path.join(directory, name))
    return files


def save(paths, carry_dir, skip) -> list[str]:
    """Packs each path into its own archive, written whole before it replaces the old one.
    Every path is checked before anything is written."""
    plan = [(os.path.join(carry_dir, archive_name(path)), members(path, skip)) for path in paths]
    os.makedirs(carry_dir, exist_ok=True)
    for target, files in plan:
        partial = target + ".partial"
        with tarfile.open(partial, "w:gz") as archive:
            for name in files:
                archive.add(name)
        os.replace(partial, target)
    return [target for target, _ in plan]


def restore(carry_dir) -> tuple[list[str], list[str]]:
    """Unpacks every archive whose run is not here yet; returns (restored, kept as they were).

    A path that already exists is left alone, since it may hold newer work than the archive.
    """
    restored, kept = [], []
    if not os.path.isdir(carry_dir):
        return restored, kept
    for name in sorted(os.listdir(carry_dir)):
        if not name.endswith(".tar.gz"):
            continue
        path = name[: -len(".tar.gz")].replace("__", os.sep)
        if os.path.exists(path):
            kept.append(path)
            continue
        with tarfile.open(os.path.join(carry_dir, name)) as archive:
            archive.extractall(".", filter="data")  # "data" refuses absolute paths and ../
        restored.append(path)
    return restored, kept


def main(argv):
    if len(argv) < 2 or argv[1] not in ("save", "restore") or (argv[1] == "save" and len(argv) < 3):
        sys.exit("usage: carry.py save PATH [PATH ...] | carry.py restore")
    os.chdir(ROOT)
    if argv[1] == "save":
        for target in save(argv[2:], FLAGS.carry_dir, tuple(FLAGS.skip)):
            print(f"wrote {target} ({os.path.getsize(target) / 2**20:.1f} MiB); commit it to carry the run over")
    else:
        restored, kept = restore(FLAGS.carry_dir)
        for path in restored:
            print(f"restored {path}")
        for path in kept:
            print(f"kept {path} as it is (it exists here; delete it first to take the carried copy)")


if __name__ == "__main__":
    app.run(main)
