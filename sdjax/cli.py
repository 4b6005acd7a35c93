"""The command-line convention of sdjax's tools: bad input is one line on stderr and exit status 2.

argparse tools use `OneLineParser`; the absl apps (train.py, plan.py) define their config file with
`define_config_file` and hand `absl_flags_parser(prog)` to `app.run`, so that absl's and
ml_collections' errors (unknown flags or config keys, bad values, config files that are missing or
raise) are one line too, reported while the flags are parsed: before any work, let alone a compile.
`check_output_dir` and `check_output_file` check a destination before anything is written there.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Callable, Iterable, NoReturn, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from sdjax import storage


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage block on errors: `prog: error: message`, exit 2, like the tools' own checks."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def closest(word: str, known: Iterable[str]) -> str | None:
    """The one of `known` closest to `word`, or None when none is close. A key that `word` abbreviates
    (lr, learn: learning_rate) counts as close, as difflib's similarity misses it."""
    known = sorted(known)
    close = ([k for k in known if word and word in ("".join(p[:1] for p in k.split("_")), k[:len(word)])]
             or difflib.get_close_matches(word, known, n=1))
    return close[0] if close else None


def unknown_key_message(dotted: str, known: Iterable[str]) -> str:
    """The error for config key `dotted` whose last part is none of `known` (its group's keys)."""
    known = sorted(known)
    group, _, leaf = dotted.rpartition(".")
    suggestion = closest(leaf, known)
    hint = f"did you mean {(group + '.' if group else '') + suggestion!r}? " if suggestion else ""
    return f"unknown config key {dotted!r} ({hint}known here: {', '.join(known)})"


def unknown_override(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """The error for an override of `config` at `dotted` (e.g. "optimizer.lr") naming the first part that
    the config lacks, or None when every part exists."""
    node, walked = config, []
    for part in dotted.split("."):
        walked.append(part)
        if not isinstance(node, ml_collections.ConfigDict):
            return f"config key {'.'.join(walked[:-1])!r} is a value, not a group: it has no key {part!r}"
        if part not in node:
            return unknown_key_message(".".join(walked), node.keys())
        node = node[part]
    return None


class ConfigFileError(flags.Error):
    """A config file that is missing or fails to load; a flags.Error, so absl passes it on unchanged."""


class _ConfigFileParser(flags.ArgumentParser):
    """Loads `file.py[:arg]` as ml_collections' own parser does (get_config(arg), then lock), but raises
    at once, in one line naming the file, where that one defers a missing file's error to the config's
    first use and re-raises the file's own errors with a traceback in the message. Keeps the config
    as loaded (`loaded`), to name an override key it lacks."""

    def __init__(self, name: str):
        self.name = name
        self.loaded: ml_collections.ConfigDict | None = None

    def flag_type(self) -> str:
        return "config object"

    def parse(self, path: str) -> ml_collections.ConfigDict:
        file, *arg = path.split(":", 1)
        if not os.path.isfile(file):
            problem = "not a file" if os.path.exists(file) else "no such file"
            raise ConfigFileError(f"--{self.name} {file}: {problem}")
        # A source loader whatever the file's suffix, as ml_collections' own parser uses.
        loader = importlib.machinery.SourceFileLoader(f"{self.name}_config", file)
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
        try:
            loader.exec_module(module)
            config = module.get_config(*arg)
        except Exception as e:  # whatever the user's file raises, named and in one line
            reason = _first_line(e)
            raise ConfigFileError(f"--{self.name} {path}: {type(e).__name__}"
                                  f"{'' if reason == type(e).__name__ else ': ' + reason}") from e
        if not isinstance(config, ml_collections.ConfigDict):
            raise ConfigFileError(f"--{self.name} {path}: get_config() returned {type(config).__name__}, "
                                  "expected a ConfigDict")
        config.lock()  # as lock_config=True: an assignment to a key that does not exist is an error
        self.loaded = config
        return config


def define_config_file(name: str, help_string: str,
                       flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """ml_collections' config-file flag (`--name file.py[:arg]`, locked, `--name.key=value` overrides)
    whose file errors are one-line ConfigFileErrors raised while the flags are parsed."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values, lock_config=True)
    flag_values[name].parser = _ConfigFileParser(name)
    return holder


def _fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _first_line(error: BaseException) -> str:
    """The error's first non-blank line (its type's name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


_BAD_VALUE = re.compile(r"flag --([\w.-]+)=(.*?): (.*)", re.DOTALL)  # absl's IllegalFlagValueError message


def _bad_value_message(error: flags.IllegalFlagValueError, flag_values: flags.FlagValues) -> str:
    """absl's "flag --config.total_steps=ten: invalid literal ..." with the type the flag expects."""
    match = _BAD_VALUE.match(str(error))
    if match is None or match[1] not in flag_values:
        return _first_line(error)
    name, value, reason = match[1], match[2], _first_line(ValueError(match[3]))
    return f"--{name}={value}: expected {flag_values[name].parser.flag_type()} ({reason})"


def _unknown_config_key(argv: Sequence[str], flag_values: flags.FlagValues) -> str | None:
    """The first `--config.key=value` in argv (for each config-file flag) that names no key of its config."""
    for name in list(flag_values):
        parser = flag_values[name].parser
        if not isinstance(parser, _ConfigFileParser) or parser.loaded is None:
            continue
        for arg in argv:  # the override syntax ml_collections accepts: --name.key[=value], -name.key, --noname.key
            match = re.match(rf"-{{1,2}}(?:no)?{re.escape(name)}\.([^=]+)", arg)
            message = match and unknown_override(parser.loaded, match[1])
            if message:
                return f"--{name}.{match[1]}: {message}"
    return None


def absl_flags_parser(prog: str, required: Sequence[str] = (),
                      flag_values: flags.FlagValues = flags.FLAGS) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for absl's `app.run(main, flags_parser=...)`: any flag error, a missing
    `required` flag or a positional argument is `prog: error: message` on stderr and exit 2 (absl
    prints a usage hint and exits 1; ml_collections raises tracebacks)."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flag_values(argv)
        except flags.IllegalFlagValueError as e:
            _fail(prog, _bad_value_message(e, flag_values))
        except flags.Error as e:
            _fail(prog, _first_line(e))
        except (KeyError, AttributeError, IndexError) as e:  # ml_collections: an override names no config key
            _fail(prog, _unknown_config_key(argv, flag_values) or _first_line(e))
        missing = [name for name in required if flag_values[name].value is None]
        if missing:
            _fail(prog, f"--{missing[0]} is required")
        if len(rest) > 1:
            _fail(prog, f"unexpected arguments: {' '.join(rest[1:])}")
        return rest

    return parse


def check_output_dir(path: str, flag: str) -> None:
    """Raises ValueError naming `flag` unless `path` is a directory this process can write in, or can be
    created as one. Creates nothing locally; a URL (gs://...) is checked by writing and deleting one
    small object there (storage.check_writable)."""
    if storage.is_remote(path):
        storage.check_writable(path, flag)
        return
    full = os.path.abspath(path)
    if os.path.lexists(full) and not os.path.isdir(full):
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    existing = full
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path}: cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {'not writable' if existing == full else 'cannot be created'}: "
                         f"no write permission in {existing}")


def check_output_file(path: str, flag: str) -> None:
    """Raises ValueError naming `flag` unless `path` can be opened for writing: an existing writable
    file, or a new name in an existing writable directory. Creates nothing locally; a URL (gs://...) is
    checked by writing and deleting one small object beside it (storage.check_writable)."""
    if storage.is_remote(path):
        storage.check_writable(path.rsplit("/", 1)[0], flag)
        return
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise ValueError(f"{flag} {path}: is a directory")
    if os.path.exists(full):
        if not os.access(full, os.W_OK):
            raise ValueError(f"{flag} {path}: no write permission")
    elif not os.path.isdir(folder):
        problem = "is not a directory" if os.path.lexists(folder) else "does not exist"
        raise ValueError(f"{flag} {path}: {folder} {problem}")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no write permission in {folder}")
