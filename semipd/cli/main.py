"""The `semipd` command. Each subcommand's flags live with the code it drives; this file parses
and turns a user's mistake into one `semipd: error:` line and exit status 2."""

import argparse
import importlib.metadata
import os
import sys

from semipd.cli import api, chat, client_commands, generate, serve
from semipd.cli.bench import command as bench
from semipd.services.scm import cli as scm_cli, evaluate as scm_eval, train as scm_train
from semipd.shared.errors import UserError


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """End every flag's help with its default, unless there is none worth showing (unset, off,
    an empty list, a switch that takes no value: "--no-prefix-cache (default: True)" would say
    the opposite of what it means) or the help already says it."""
    for action in parser._actions:
        default = action.default
        if not action.option_strings or action.nargs == 0 or default is None or default is False \
                or default == [] or default == argparse.SUPPRESS or "default" in (action.help or ""):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semipd", description="semi-PD LLM serving")
    parser.add_argument("--version", action="version", version=f"semipd {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, serve, api, client_commands, chat, bench, scm_train, scm_eval, scm_cli):
        module.add_parser(sub)
    for command in sub.choices.values():
        show_defaults(command)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """The parsed arguments. A flag the subcommand does not know is reported with that
    subcommand's usage, not the top-level one (argparse leaves unknown ones to the top)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def version() -> str:
    """The installed distribution's version; a checkout run through PYTHONPATH has none."""
    try:
        return importlib.metadata.version("semipd")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source checkout)"


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    try:
        args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe raises below and not at exit
    except UserError as e:
        print(f"semipd: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`semipd stats | head -1`): no traceback, but status 1 as a
        # tool killed by SIGPIPE fails, since not all output was written (it shows only under
        # pipefail). Python flushes stdout again at exit: point it at devnull so that cannot raise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
