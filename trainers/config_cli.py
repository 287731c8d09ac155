"""`rlhf config show`: print the resolved configuration as YAML."""

from __future__ import annotations

import argparse

from trainers.config import dump_yaml, load_config


def _show(args: argparse.Namespace) -> int:
    """Print the resolved config, with credentials (e.g. a password in cluster.ray_address) redacted."""
    print(dump_yaml(load_config(args.config, args.overrides), with_docs=args.doc), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from trainers.cli import add_config_args

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", parser_class=type(config))
    config_sub.required = True
    show = config_sub.add_parser("show", help="print the resolved config (file + overrides) as YAML")
    add_config_args(show)
    show.add_argument("--doc", action="store_true", help="annotate every key with its documentation")
    show.set_defaults(func=_show)
