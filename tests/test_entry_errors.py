"""train.py and plan.py refuse bad input in one line (`prog: error: ...`, exit 2), before any compile and
before writing anything: unknown or mistyped config keys, config files that are missing or raise,
absl's own flag errors, a workdir that cannot be one, a --json that cannot be written.

The mechanism (sdjax.cli) is checked in-process on a throwaway FlagValues with a small config file;
the entry points end to end in subprocesses, each behind a tripwire that ends the process (exit 3)
at the first XLA compile, so "before any compile" is observed rather than assumed.
"""

import os
import subprocess
import sys

import pytest
from absl import flags

from sdjax.cli import absl_flags_parser, define_config_file

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

CONFIG = """
import ml_collections

def get_config():
    config = ml_collections.ConfigDict()
    config.total_steps = 10
    config.optimizer = ml_collections.ConfigDict({"learning_rate": 1e-4, "warmup_steps": 0})
    return config
"""


def _snapshot(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, files in os.walk(folder) for name in dirs + files)


def _assert_one_line_exit_2(code, err, prog, message):
    assert code == 2, err
    assert err.startswith(f"{prog}: error: ") and message in err and err.strip().count("\n") == 0, err


@pytest.mark.parametrize("args,message", [
    (["--workdir=w", "--config.optimizer.lr=1"], "--config.optimizer.lr: unknown config key 'optimizer.lr' "
                                                 "(did you mean 'optimizer.learning_rate'?"),
    (["--workdir=w", "--config.nogroup.x=1"], "unknown config key 'nogroup' (known here: optimizer, total_steps)"),
    (["--workdir=w", "--config.total_steps.x=1"], "config key 'total_steps' is a value, not a group"),
    (["--workdir=w", "--config.total_steps=ten"], "--config.total_steps=ten: expected int"),
    (["--workdir=w", "--config.optimizer.learning_rate=abc"], "--config.optimizer.learning_rate=abc: expected float"),
    (["--workdir=w", "--bogus"], "Unknown command line flag 'bogus'"),
    (["--workdir=w", "stray"], "unexpected arguments: stray"),
    ([], "--workdir is required"),
])
def test_flag_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    config = tmp_path / "config.py"
    config.write_text(CONFIG)
    before = _snapshot(tmp_path)
    _parse(["prog", f"--config={config}", *args], monkeypatch, capsys, message)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("body,message", [
    (None, "no such file"),
    ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ("def get_config():\n    return 1 / 0\n", "ZeroDivisionError: division by zero"),
    ("def get_config(:\n", "SyntaxError: "),
    ("def get_config():\n    return {'a': 1}\n", "get_config() returned dict, expected a ConfigDict"),
])
def test_config_file_errors_name_the_file(tmp_path, monkeypatch, capsys, body, message):
    config = tmp_path / "config.py"
    if body is not None:
        config.write_text(body)
    before = _snapshot(tmp_path)
    _parse(["prog", f"--config={config}", "--workdir=w", "--config.total_steps=3"], monkeypatch, capsys,
           f"--config {config}: {message}")
    assert _snapshot(tmp_path) == before


def _parse(argv, monkeypatch, capsys, message):
    """Parses argv with the entry points' flags parser on fresh flags; asserts a one-line exit 2."""
    flag_values = flags.FlagValues()
    define_config_file("config", "a config file", flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "run directory", flag_values=flag_values)
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the --config.* overrides from sys.argv
    with pytest.raises(SystemExit) as exit_info:
        absl_flags_parser("prog", required=("config", "workdir"), flag_values=flag_values)(argv)
    _assert_one_line_exit_2(exit_info.value.code, capsys.readouterr().err, "prog", message)


# --- the entry points end to end ----------------------------------------------------------------

TRIPWIRE = """
import os, runpy, sys
import jax.monitoring

def compiled(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        sys.stderr.write("tripwire: XLA compiled before the error\\n")
        os._exit(3)

jax.monitoring.register_event_duration_secs_listener(compiled)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(script, *args, cwd):
    """`python script args` with the compile tripwire; returns (exit code, stderr)."""
    env = dict(os.environ, SDJAX_DATA_DIR=str(cwd / "datasets"))
    result = subprocess.run([sys.executable, "-c", TRIPWIRE, os.path.join(ROOT, script), *args], cwd=cwd,
                            capture_output=True, text=True, env=env, timeout=300)
    return result.returncode, result.stderr


@pytest.mark.parametrize("args,message", [
    (["--workdir=run", "--config.optimizer.lr=1"], "did you mean 'optimizer.learning_rate'?"),
    (["--workdir=afile"], "--workdir afile: exists and is not a directory"),
    (["--workdir=afile/sub/run"], "--workdir afile/sub/run: cannot be created: "),
])
def test_train_refuses_before_compiling_or_writing(tmp_path, args, message):
    (tmp_path / "afile").write_text("not a folder")
    before = _snapshot(tmp_path)
    code, err = _run("train.py", f"--config={TINY}", *args, cwd=tmp_path)
    _assert_one_line_exit_2(code, err, "train.py", message)
    assert _snapshot(tmp_path) == before


def test_train_names_a_missing_config_file(tmp_path):
    code, err = _run("train.py", "--config=nowhere.py", "--workdir=run", cwd=tmp_path)
    _assert_one_line_exit_2(code, err, "train.py", "--config nowhere.py: no such file")
    assert _snapshot(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a read-only folder")
def test_train_refuses_a_workdir_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = _run("train.py", f"--config={TINY}", "--workdir=locked/run", cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    _assert_one_line_exit_2(code, err, "train.py", "--workdir locked/run: cannot be created: no write permission")
    assert _snapshot(tmp_path) == ["locked"]


@pytest.mark.parametrize("args,message", [
    (["--json=afile/plan.json"], "--json afile/plan.json: "),
    (["--json=plan.json", "--config.optimizer.lr=1"], "did you mean 'optimizer.learning_rate'?"),
])
def test_plan_refuses_before_compiling_or_writing(tmp_path, args, message):
    (tmp_path / "afile").write_text("not a folder")
    before = _snapshot(tmp_path)
    code, err = _run("plan.py", f"--config={TINY}", "--mesh=data=1", "--nosample", *args, cwd=tmp_path)
    _assert_one_line_exit_2(code, err, "plan.py", message)
    assert _snapshot(tmp_path) == before


def test_train_checks_every_sweep_point_before_the_first_runs(tmp_path):
    """A bad value in sweep point 1 fails before point 0 trains (or writes anything)."""
    config = tmp_path / "swept.py"
    config.write_text(f"import runpy\nget_config = runpy.run_path({TINY!r})['get_config']\n\n\n"
                      "def sweep(add):\n    add(**{'optimizer.learning_rate': 1e-3})\n"
                      "    add(**{'optimizer.learning_rate': float('nan')})\n")
    before = _snapshot(tmp_path)
    code, err = _run("train.py", f"--config={config}", "--workdir=run", "--sweep=all", cwd=tmp_path)
    _assert_one_line_exit_2(code, err, "train.py", "optimizer.learning_rate must be a finite number > 0, got nan")
    assert _snapshot(tmp_path) == before
