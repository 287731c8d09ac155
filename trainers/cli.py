"""The `rlhf` command line.

    rlhf config show --config trainers/configs/tiny.yaml ppo.kl_coef=0.1
    rlhf data synth --out /tmp/world

Each command module exposes ``register(subparsers)``; a leaf command sets ``func(args) -> int``.
A :class:`trainers.errors.UserError` becomes its line(s) on stderr and exit code 2; any other
exception is internal and keeps its traceback, except :class:`trainers.errors.RunStopped` (a run that
cannot go on: one line, exit code 3).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trainers.errors import RunStopped, UserError

# Command modules, in help order. A module is listed here only once its commands work.
COMMAND_MODULES = [
    "trainers.demo",
    "trainers.data.cli",
    "trainers.stages.cli",
    "trainers.ppo_cli",
    "trainers.evaluation.cli",
    "trainers.config_cli",
]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every config-driven command takes: --config FILE and key=value overrides."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. ppo.kl_coef=0.05"
    )


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2 (its own convention too)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf", description="InstructGPT-style RLHF (SFT, reward model, PPO-ptx) on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _redacted(text: str) -> str:
    """``text`` without secrets (an address echoed back may carry a password; env tokens never show)."""
    from trainers.redact import redact_text

    return redact_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        # Problem lists (e.g. data validation) are printed verbatim, one per line; a plain message gets
        # the usual prefix. Either way: no traceback, exit code 2.
        lines = err.lines if err.verbatim else [f"rlhf: error: {err}"]
        print(_redacted("\n".join(lines)), file=sys.stderr)
        return 2
    except RunStopped as err:
        # Not the user's input and not a bug in this program: one line, and a rerun resumes.
        print(_redacted(f"rlhf: stopped: {err}"), file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
