"""``recsys``: the command line. It parses arguments and calls library functions, nothing more.

Exit codes: 0 success, 2 bad usage (argparse), 1 failure with a one-line ``error: ...`` message
naming the bad input. User errors never print a traceback; set ``RECSYS_DEBUG=1`` to see one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cli import (
    data_commands,
    model_commands,
    quickstart,
    serve_command,
    simulate_command,
    tune_command,
)
from data.errors import RecsysError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="A multi-stage recommender: data, training, evaluation, serving, A/B tests.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_commands.register(commands)
    model_commands.register(commands)
    serve_command.register(commands)
    simulate_command.register(commands)
    tune_command.register(commands)
    quickstart.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
    except RecsysError as exc:
        return _fail(exc)
    except (
        OSError,
        MemoryError,
    ) as exc:  # unreadable path, full disk, ...: still the user's to fix
        return _fail(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result


def _fail(exc: BaseException) -> int:
    if os.environ.get("RECSYS_DEBUG"):
        raise exc
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
