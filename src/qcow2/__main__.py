"""`python -m qcow2` runs the command-line tool."""

from .cli.main import entry

entry()
