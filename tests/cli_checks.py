"""What every command-line entry point owes bad input: exit 2 and a one-line error naming the problem."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_one_line_exit_2(main: Callable[[Sequence[str]], int], argv: Sequence[str], message: str, capsys) -> None:
    """Runs `main(argv)` in-process; argparse's own errors arrive as SystemExit, the CLI's checks as a return code."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.strip().count("\n") == 0, err


def train_tiny(config: str, workdir, pretrained: str, data_dir: str, *flags: str) -> subprocess.CompletedProcess:
    """train.py with configs/<config>:tiny fine-tuning `pretrained`, datasets under `data_dir`, no progress bar."""
    env = dict(os.environ, SDJAX_DATA_DIR=data_dir)
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                           f"--config={os.path.join(ROOT, 'configs', config)}:tiny", f"--workdir={workdir}",
                           f"--config.model.pretrained={pretrained}", "--config.log.progress_bar=False", *flags],
                          capture_output=True, text=True, env=env, timeout=900)
