"""What every command-line entry point owes bad input: exit 2 and a one-line error naming the problem."""

from __future__ import annotations

from typing import Callable, Sequence


def assert_one_line_exit_2(main: Callable[[Sequence[str]], int], argv: Sequence[str], message: str, capsys) -> None:
    """Runs `main(argv)` in-process; argparse's own errors arrive as SystemExit, the CLI's checks as a return code."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.strip().count("\n") == 0, err
