"""``rlhf data``: validate, prepare (InstructGPT hygiene) and synthesise data sets.

    rlhf data validate --kind comparisons data/cmp.jsonl more.parquet hf_saved_dir/
    rlhf data prepare --kind prompts raw/*.jsonl --out data/prompts --seed 0
    rlhf data synth --out data/synth --seed 0 --scale 1.0

The top-level ``rlhf`` CLI calls :func:`register`; every leaf command sets ``func(args) -> int`` (the
exit code). User errors are raised as :class:`~trainers.errors.UserError` whose ``lines`` are complete
on their own (for ``validate``: exactly the problem lines); the caller prints them to stderr and
exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trainers.data.prepare import (
    DEFAULT_MAX_PER_USER,
    DEFAULT_PREFIX_CHARS,
    DEFAULT_TEST_FRAC,
    DEFAULT_VALID_FRAC,
    prepare,
)
from trainers.data.schema import KINDS
from trainers.data.validate import validate_files
from trainers.errors import DataError, UserError


def _print_mapping(mapping: dict) -> None:
    """Print a summary dict as ``key: value`` lines on stdout."""
    for key, value in mapping.items():
        print(f"{key}: {value}")


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate files; ``OK: N records in M files`` (warnings on stderr), or raise with the problem lines."""
    report = validate_files(args.kind, args.paths)
    if not report.ok:
        # The message is a summary so that the lines (the problems, verbatim) are never mistaken for a
        # plain one-line message that the top-level CLI would prefix with "rlhf: error:".
        many = "s" if report.n_problems > 1 else ""
        raise DataError(f"invalid data: {report.n_problems} problem{many}", lines=report.problem_lines())
    for line in report.warning_lines():
        print(line, file=sys.stderr)
    records = "record" if report.n_records == 1 else "records"
    files = "file" if report.n_files == 1 else "files"
    print(f"OK: {report.n_records} {records} in {report.n_files} {files}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Dedup, cap and split into ``--out``; print the counts."""
    counts = prepare(
        args.kind,
        args.paths,
        args.out,
        prefix_chars=args.prefix_chars,
        max_per_user=args.max_per_user,
        valid_frac=args.valid_frac,
        test_frac=args.test_frac,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    _print_mapping(counts)
    print(f"wrote: {args.out}/{{train,valid,test}}.parquet")
    return 0


def check_synth_args(args: argparse.Namespace) -> None:
    """UserError (before anything is written) for a scale that is not positive or an unusable ``--out``."""
    from trainers.runs.outdir import check_output_dir

    if not args.scale > 0:
        raise UserError(f"--scale must be > 0 (1.0 is the full size), got {args.scale}")
    check_output_dir(args.out)


def cmd_synth(args: argparse.Namespace) -> int:
    """Write the synthetic instruction world into ``--out``; print its summary."""
    check_synth_args(args)
    # Imported here: the world pulls in the tokenizer stack, which validate/prepare do not need.
    world = importlib.import_module("trainers.data.world")
    summary = world.synthesize(args.out, seed=args.seed, scale=args.scale)
    _print_mapping(summary)
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check data files against a kind's schema",
        description="Check data files (.parquet, .jsonl, .json = JSON Lines, .arrow) or datasets save_to_disk "
        "directories (every split of a DatasetDict); each file's format (e.g. messages or prompt/response) "
        "is told by its fields. Exit 0 and 'OK: N records in M files' when valid; otherwise exit 2 and one "
        "'PATH:RECORD: field NAME: problem' line per problem (first 20) on stderr.",
    )
    p.add_argument("--kind", required=True, choices=KINDS, help="data kind (schema) of the files")
    p.add_argument("paths", nargs="+", metavar="PATH", help="data files or save_to_disk directories")
    p.set_defaults(func=cmd_validate)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="dedup by prompt prefix, cap per user, split by user (InstructGPT 3.2)",
        description="Validate the inputs, drop prompts sharing a long common prefix with an earlier one, "
        "keep at most --max-per-user records per user_id, and split users into DIR/train.parquet, "
        "DIR/valid.parquet, DIR/test.parquet so that no user is in two splits.",
    )
    p.add_argument("--kind", required=True, choices=KINDS, help="data kind (schema) of the inputs")
    p.add_argument("paths", nargs="+", metavar="IN", help="input data files or save_to_disk directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--prefix-chars",
        type=int,
        default=DEFAULT_PREFIX_CHARS,
        metavar="N",
        help="prompts whose first N characters (lower-cased, whitespace collapsed) equal an earlier "
        "kept prompt's are duplicates; shorter prompts compare whole. %(default)s chars is ~10-12 words: "
        "independent prompts rarely share that much, edited resubmissions do. Keep N above any fixed "
        "template preamble; 0 disables (default: %(default)s)",
    )
    p.add_argument(
        "--max-per-user",
        type=int,
        default=DEFAULT_MAX_PER_USER,
        metavar="N",
        help="keep at most N records per user_id, 0 = no cap (default: %(default)s)",
    )
    p.add_argument(
        "--valid-frac",
        type=float,
        default=DEFAULT_VALID_FRAC,
        help="fraction of users (default: %(default)s)",
    )
    p.add_argument(
        "--test-frac", type=float, default=DEFAULT_TEST_FRAC, help="fraction of users (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the user shuffle (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing split files in DIR")
    p.set_defaults(func=cmd_prepare)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the deterministic synthetic instruction data set",
        description="Write the synthetic world (all data kinds) into DIR; same seed, same files.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="size multiplier (default: %(default)s)")
    p.set_defaults(func=cmd_synth)


def add_data_commands(parser: argparse.ArgumentParser) -> None:
    """Add the ``validate``, ``prepare`` and ``synth`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="data_command", metavar="{validate,prepare,synth}", required=True)
    _add_validate(sub)
    _add_prepare(sub)
    _add_synth(sub)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command (with its subcommands) to the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "data",
        help="validate, prepare (dedup, cap, split) or synthesise data",
        description="Data tools: validate files, apply InstructGPT data hygiene, write the synthetic set.",
    )
    add_data_commands(parser)
    return parser
