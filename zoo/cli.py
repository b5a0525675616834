"""`zoo`: list, inspect, publish, remove, verify, export, serve and query zoo encoders.

    zoo list                                   published models (latest version of each)
    zoo info NAME[:VERSION]                    the model card (JSON)
    zoo publish RUN_DIR --name NAME            publish a `recipes.train --model_dir`
    zoo rm NAME[:VERSION]                      remove a version, or every version
    zoo label NAME LABEL VERSION               point a version label (e.g. stable) at a version
    zoo verify                                 re-hash every file; exit 1 if anything is corrupt
    zoo export NAME --format=saved_model|onnx  write a standalone copy somewhere else
    zoo serve [NAME...] [server flags]         serve entries over TF Serving's gRPC/REST APIs
    zoo embed --model=NAME FILES...            embed image files with a running server

`--store` (before the command) picks the store; default $ZOO_HOME, else ~/.ssl_zoo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from zoo import EMBEDDINGS

_DELEGATED = ("serve", "embed")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="Self-supervised model zoo.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--store", default=None, help="store directory, tf.io.gfile URI or http(s) URL")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list published models")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("info", help="show a model card")
    s.add_argument("ref", metavar="NAME[:VERSION]")

    s = sub.add_parser("publish", help="publish a training run directory")
    s.add_argument("run_dir")
    s.add_argument("--name", required=True)
    s.add_argument("--label", action="append", default=[], help="version label(s) to point at it")
    s.add_argument("--description", default=None)
    s.add_argument("--embedding", choices=EMBEDDINGS, default="encoder",
                   help="publish the encoder's features (default) or the encoder + the recipe's projection head")

    s = sub.add_parser("rm", help="remove a version (NAME:VERSION) or a whole model (NAME)")
    s.add_argument("ref", metavar="NAME[:VERSION]")

    s = sub.add_parser("label", help="point a version label at a version")
    s.add_argument("name")
    s.add_argument("label")
    s.add_argument("version", type=int)

    s = sub.add_parser("verify", help="re-hash every published file")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("export", help="export a published encoder to another format")
    s.add_argument("ref", metavar="NAME[:VERSION]")
    s.add_argument("--format", choices=("saved_model", "onnx"), default="saved_model")
    s.add_argument("--output", default=None, help="default: ./NAME_VVERSION (.onnx for onnx)")

    for name in _DELEGATED:
        sub.add_parser(name, help=f"see `zoo {name} --help`", add_help=False)
    return p


def _split_delegated(argv: list[str]):
    """(store, command, rest) when argv runs `serve`/`embed`, whose flags belong to `serving`."""
    store, i = None, 0
    while i < len(argv):
        token = argv[i]
        if token == "--store" and i + 1 < len(argv):
            store, i = argv[i + 1], i + 2
        elif token.startswith("--store="):
            store, i = token.split("=", 1)[1], i + 1
        elif token in _DELEGATED:
            return store, token, argv[i + 1:]
        else:
            return None
    return None


def _print_table(rows: list[dict]) -> None:
    if not rows:
        print("No models published in this store. Publish one with `zoo publish RUN_DIR --name NAME`.")
        return
    header = ("NAME", "LATEST", "VERSIONS", "RECIPE", "BACKBONE", "DATASET", "DIM", "METRICS")
    table = [header]
    for m in rows:
        metrics = " ".join(f"{k}={v:.3f}" for k, v in (m.get("metrics") or {}).items())
        table.append((m["name"], str(m["latest"]), ",".join(map(str, m["versions"])), str(m.get("recipe")),
                      str(m.get("backbone")), str(m.get("dataset")), str(m.get("embedding_dim")), metrics))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _export(args) -> int:
    import zoo
    from zoo import export
    from zoo.index import parse_ref

    name, version = parse_ref(args.ref)
    number = zoo.info(name, version, store=args.store)["version"]  # resolved once: a publish meanwhile
    encoder = zoo.load(name, number, store=args.store)  # cannot make the file name and contents disagree
    suffix = ".onnx" if args.format == "onnx" else ""
    output = args.output or f"{name}_v{number}{suffix}"
    if os.path.exists(output):
        print(f"error: {output} exists; choose another --output or remove it.", file=sys.stderr)
        return 1
    if args.format == "saved_model":
        export.write_saved_model(encoder, output)
    else:
        try:
            import numpy as np

            encoder(np.zeros((1, *export.encoder_input_shape(encoder)), "float32"))  # the exporter needs a call
            encoder.export(output, format="onnx", verbose=False)
        except ImportError as e:
            print(f"error: ONNX export needs `pip install tf2onnx onnx` ({e}).", file=sys.stderr)
            return 1
        except Exception as e:  # the converter's failures are many and unrelated to the zoo
            print(f"error: the Keras ONNX exporter (tf2onnx) failed on {name}:{number}: "
                  f"{type(e).__name__}: {e}. Use --format=saved_model instead.", file=sys.stderr)
            return 1
    print(f"exported {name}:{number} ({args.format}) to {output}")
    return 0


def _run(args) -> int:
    import zoo

    store = args.store
    if args.command == "list":
        rows = zoo.list_models(store=store)
        print(json.dumps(rows, indent=2)) if args.json else _print_table(rows)
    elif args.command == "info":
        print(json.dumps(zoo.info(args.ref, store=store), indent=2, sort_keys=True))
    elif args.command == "publish":
        ref = zoo.publish(args.run_dir, name=args.name, store=store, labels=args.label,
                          description=args.description, embedding=args.embedding)
        print(f"published {ref}")
    elif args.command == "rm":
        removed = zoo.remove(args.ref, store=store)
        name = args.ref.split(":", 1)[0]
        print(f"removed {', '.join(f'{name}:{v}' for v in removed)}")
    elif args.command == "label":
        zoo.set_label(args.name, args.label, args.version, store=store)
        print(f"{args.name}:{args.label} -> {args.version}")
    elif args.command == "verify":
        report = zoo.verify(store=store)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for ref in report["checked"]:
                problems = report["corrupt"].get(ref)
                print(f"{'CORRUPT' if problems else 'ok':8} {ref}")
                for problem in problems or ():
                    print(f"         {problem}")
            for path in report["leftovers"]:
                print(f"{'unlisted':8} {path} (from an interrupted publish; safe to delete)")
            print(f"{len(report['checked'])} checked, {len(report['corrupt'])} corrupt")
        return 1 if report["corrupt"] else 0
    elif args.command == "export":
        return _export(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zoo` console script; returns the exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the output
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _split_delegated(argv)
    args = None if delegated else _parser().parse_args(argv)
    from zoo.errors import ZooError

    try:
        return _delegate(*delegated) if delegated else _run(args)
    except (ZooError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _delegate(store: str | None, command: str, rest: list[str]) -> int:
    """`zoo serve` / `zoo embed` belong to `serving`, imported only here (zoo never needs it otherwise)."""
    if store is not None:
        os.environ["ZOO_HOME"] = store  # serving resolves zoo names through the default store
    if command == "serve":
        from serving import server

        return server.main(rest)
    from serving import client

    return client.main(rest)


if __name__ == "__main__":
    sys.exit(main())
