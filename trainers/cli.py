"""The `rlhf` command line (``python -m trainers.cli`` is the same without the console script).

    rlhf config show --config trainers/configs/tiny.yaml ppo.kl_coef=0.1
    rlhf data synth --out /tmp/world
    rlhf demo
    rlhf pipeline --config my.yaml --out runs/mine model.path=/models/my-instruct data.dir=/data/mine
    rlhf upload-size .      # what `ray job submit --working-dir .` would upload

Each command module exposes ``register(subparsers)``; a leaf command sets ``func(args) -> int``. The
modules are imported here, at the top, and import nothing heavy themselves (torch, Ray and the models
load inside the command that needs them), so ``rlhf --help`` and every argument or config error are
instant. A :class:`trainers.errors.UserError` becomes its line(s) on stderr and exit code 2; any other
exception is internal and keeps its traceback, except :class:`trainers.errors.RunStopped` (a run that
cannot go on: one line, exit code 3).
"""

from __future__ import annotations

import argparse
import sys

from cluster import upload
from trainers import demo, pipeline
from trainers.config import add_config_args, dump_yaml, load_config
from trainers.data import cli as data_cli
from trainers.errors import RunStopped, UserError
from trainers.evaluation import cli as eval_cli
from trainers.ppo import cli as ppo_cli
from trainers.redact import redact_text
from trainers.stages import cli as stage_cli

COMMAND_MODULES = (demo, pipeline, data_cli, stage_cli, ppo_cli, eval_cli)
"""Modules whose ``register(subparsers)`` adds their commands, in help order (``upload-size`` and ``config``
are added last)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2 (its own convention too)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config_show(args: argparse.Namespace) -> int:
    """Print the resolved config, with credentials (e.g. a password in cluster.ray_address) redacted."""
    print(dump_yaml(load_config(args.config, args.overrides), with_docs=args.doc), end="")
    return 0


def register_config(sub: argparse._SubParsersAction) -> None:
    """``rlhf config show``: the resolved configuration as YAML (``--doc``: every key documented)."""
    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", parser_class=type(config))
    config_sub.required = True
    show = config_sub.add_parser("show", help="print the resolved config (file + overrides) as YAML")
    add_config_args(show)
    show.add_argument("--doc", action="store_true", help="annotate every key with its documentation")
    show.set_defaults(func=_config_show)


def _upload_size(args: argparse.Namespace) -> int:
    """Print what Ray would upload from ``args.dir``; a :class:`UserError` (exit 2) if Ray would refuse it."""
    measured = upload.measure_upload(args.dir, tuple(args.exclude))
    print("\n".join(upload.report(measured, args.largest)))
    upload.check_upload(measured)
    return 0


def register_upload_size(sub: argparse._SubParsersAction) -> None:
    """``rlhf upload-size [DIR]``: what ``ray job submit --working-dir DIR`` would upload, by Ray's own rules."""
    size = sub.add_parser(
        "upload-size",
        help="what `ray job submit --working-dir DIR` would upload (Ray's rules); exit 2 over Ray's limit",
    )
    size.add_argument("dir", nargs="?", default=".", help="the working directory to measure (default: .)")
    size.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="a runtime_env 'excludes' pattern the submit will pass (repeatable)",
    )  # fmt: skip
    size.add_argument(
        "--largest", type=int, default=5, metavar="N", help="list the N largest files (default 5)"
    )
    size.set_defaults(func=_upload_size)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf", description="InstructGPT-style RLHF (SFT, reward model, PPO-ptx) on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    register_upload_size(sub)
    register_config(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        # Problem lists (e.g. data validation) are printed verbatim, one per line; a plain message gets
        # the usual prefix. Either way: no traceback, exit code 2. An address echoed back may carry a
        # password, and an environment token must never show: every line is redacted.
        lines = err.lines if err.verbatim else [f"rlhf: error: {err}"]
        print(redact_text("\n".join(lines)), file=sys.stderr)
        return 2
    except RunStopped as err:
        # Not the user's input and not a bug in this program: one line, and a rerun resumes.
        print(redact_text(f"rlhf: stopped: {err}"), file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
