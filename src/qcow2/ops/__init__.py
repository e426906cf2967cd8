"""Whole-image operations (info, map, ...) on the BlockDevice protocol, independent of the CLI."""
