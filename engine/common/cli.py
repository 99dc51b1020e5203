"""What every command's --help shares: defaults shown once, where the help text does not state them itself."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without "(default: None)" on options that have none, and without a second
    default on help texts that already say theirs ("default: ...", "(default ...")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)
