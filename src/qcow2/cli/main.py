"""Entry point of the `qcow2` command: dispatch to one module per subcommand, map errors.

Subcommand modules are imported lazily so that `qcow2 info` starts fast. Each module has
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

PROG = "qcow2"

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("qcow2.cli.info", "show information about an image"),
    "map": ("qcow2.cli.map", "dump the metadata of an image"),
    "convert": ("qcow2.cli.convert", "convert an image to another format"),
    "compare": ("qcow2.cli.compare", "check whether two images have the same content"),
    "create": ("qcow2.cli.create", "create a new disk image"),
    "io": ("qcow2.cli.io", "run qemu-io style commands on an image"),
    "resize": ("qcow2.cli.resize", "grow or shrink an image"),
    "dd": ("qcow2.cli.dd", "copy an image block by block, converting its format"),
    "check": ("qcow2.cli.check", "check an image for consistency, optionally repair it"),
    "snapshot": ("qcow2.cli.snapshot", "list, create, apply or delete internal snapshots"),
    "measure": ("qcow2.cli.measure", "calculate the file size needed for a new image"),
    "rebase": ("qcow2.cli.rebase", "change the backing file of an image"),
    "commit": ("qcow2.cli.commit", "commit an image's changes into its backing file"),
    "amend": ("qcow2.cli.amend", "change the format-specific options of an image"),
}


class UsageError(Exception):
    """Bad command line: printed as `qcow2: <msg>`, exit 1 (as qemu-img)."""


class ArgParser(argparse.ArgumentParser):
    """argparse with qemu-img's reaction to bad usage: one line on stderr, exit 1."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def error_line(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")


def usage() -> str:
    lines = [f"usage: {PROG} COMMAND [options]", "", "Commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in:
        error_line("Not enough arguments")
        sys.stderr.write(f"Try '{PROG} --help' for more information\n")
        return 1
    cmd = args_in[0]
    if cmd in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    if cmd in ("-V", "--version"):
        from .. import __version__

        sys.stdout.write(f"{PROG} version {__version__}\n")
        return 0
    if cmd not in COMMANDS:
        error_line(f"Command not found: {cmd}")
        return 1
    module = importlib.import_module(COMMANDS[cmd][0])
    if hasattr(module, "fix_argv"):
        args_in = [cmd, *module.fix_argv(args_in[1:])]
    parser = ArgParser(prog=f"{PROG} {cmd}", description=COMMANDS[cmd][1])
    module.add_arguments(parser)
    try:
        args = parser.parse_args(args_in[1:])
        return int(module.run(args))
    except UsageError as e:
        error_line(str(e))
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: still one line for users; QCOW2_DEBUG=1 shows the trace
        if os.environ.get("QCOW2_DEBUG"):
            raise
        error_line(f"internal error: {type(e).__name__}: {e}")
        return 1


def entry() -> NoReturn:
    sys.exit(main())
