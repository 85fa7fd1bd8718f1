"""The ``medassist`` command: a thin layer over the library; the only place that prints.

One module per stage registers its subcommands (``add_commands``): ``train``, ``data``
(models, data stats, import-medquad, tokens), ``evaluate``, ``serve`` (generate, chat, serve),
``export``, ``index``. User errors (:class:`~medassist.errors.MedassistError`) become one line
on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from medassist.errors import MedassistError


def build_parser() -> argparse.ArgumentParser:
    from medassist.cli import data, evaluate, export, index, serve, train

    parser = argparse.ArgumentParser(
        prog="medassist",
        description="Fine-tune, evaluate and serve small language models as medical QA assistants.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (train.add_commands, data.add_commands, evaluate.add_commands,
                     serve.add_serving_commands, export.add_commands, index.add_commands):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # nothing phones home unless asked
    # oneDNN keeps every matmul kernel it builds (1,024 by default), one per shape, and training
    # sees many shapes: they held ~0.5 GiB at the default run's peak; at 128 that run trained
    # no slower (bench/RESULTS.md)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedassistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
