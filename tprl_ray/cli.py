"""The ``tprl`` command line, built from the commands each stage's config module declares.

Only the light config modules (pydantic, no torch, Ray or transformers) are imported to build the
parser; a command's run function is imported when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tprl_ray.config import Command, ConfigError, add_config_args, config_from_args

STAGES = ("data", "models", "pipeline", "precompute", "training", "service", "rl", "evaluation", "bench")


def commands() -> list[Command]:
    """Every stage's ``COMMANDS``, in data-flow order."""
    return [c for stage in STAGES for c in importlib.import_module(f"tprl_ray.{stage}.config").COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tprl", description="TPRL: token pruning by RL, on Ray.")
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nested: dict[str, argparse._SubParsersAction] = {}
    for command in commands():
        if len(command.words) == 1:
            sub = groups.add_parser(command.words[0], help=command.help, description=command.help)
        else:
            group_name, name = command.words
            if group_name not in nested:
                group = groups.add_parser(group_name, help=f"{group_name} commands")
                nested[group_name] = group.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = nested[group_name].add_parser(name, help=command.help, description=command.help)
        add_config_args(sub, command.config, positional=command.positional)
        sub.set_defaults(_command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args._command
    try:
        cfg = config_from_args(args, command.config)
        run = command.function()
    except ConfigError as exc:
        print(f"tprl: error: {exc}", file=sys.stderr)
        return 2
    from tprl_ray.backbones.base import BackboneError
    from tprl_ray.data.layout import DataError

    try:
        run(cfg)
    except (ConfigError, DataError, BackboneError, ValueError, FileNotFoundError) as exc:
        print(f"tprl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
