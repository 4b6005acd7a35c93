"""The command-line convention of sdjax's tools: bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage block on errors: `prog: error: message`, exit 2, like the tools' own checks."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")
