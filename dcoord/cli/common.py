"""Options shared by the subcommands."""

from __future__ import annotations

import argparse


def url_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--url``/``--namespace`` options every command that talks to a backend takes."""
    parser.add_argument("--url", help="backend URL (default: $DCOORD_URL, else memory://)")
    parser.add_argument("--namespace", help="key namespace (default: 'default')")
