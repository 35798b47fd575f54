"""What every command line shares: an input it cannot use is one line naming the file, key or
value, printed once (rank 0), exit status 2, no traceback (unexpected errors keep theirs); the
process group a command runs in; the text lengths of evaluation commands."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Optional

from . import distributed
from .config import ConfigError, load_config
from .fileio import ConversionError

# A configuration or input that cannot be used (a ConfigError names the key or file; a
# ConversionError the checkpoint file, tag or key).
INPUT_ERRORS = (ConfigError, ConversionError)
EXIT_INPUT_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a mistake on the command line (an unknown option, a missing one, a
    value of the wrong type) said as every other input error is: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        if distributed.rank() == 0:
            print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_ERROR)


def report_input_error(exc: Exception) -> int:
    """Prints `exc` on one line (on rank 0 only, while a process group is up) and returns the exit status."""
    if distributed.rank() == 0:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
    return EXIT_INPUT_ERROR


def run_in_process_group(command: Callable[[], int]) -> int:
    """Runs `command` in a process group of any launcher (deepspeed, torchrun, srun, mpirun) or of
    this process alone, torn down afterwards; a user's mistake, met by every rank, is said once."""
    started = distributed.init_distributed()
    try:
        return command()
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    finally:
        if started:
            distributed.shutdown()


def check_writable_folder(path: str, option: str) -> None:
    """ConfigError naming `option` unless `path` is, or can be made, a folder this process can write
    into; creates nothing (a command checks its output before it loads a model)."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable")


def check_writable_file(path: str, option: str) -> None:
    """ConfigError naming `option` unless a file can be written at `path` (its folder checked as
    check_writable_folder does; a folder or an unwritable file in its place refused)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a folder, not a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path} is not writable")
    check_writable_folder(os.path.dirname(path), option)


def check_at_least(values: dict, least: int) -> None:
    """ConfigError naming the first option whose number is below `least` ({option: value})."""
    for option, value in values.items():
        if value is not None and value < least:
            raise ConfigError(f"{option} is {value}: it must be at least {least}")


def read_lines(path: str, option: str) -> list[str]:
    """The non-empty lines of a text file given as `option` (ConfigError naming it when it cannot
    be read or holds none)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path}: {exc}") from None
    if not lines:
        raise ConfigError(f"{option} {path} holds no text")
    return lines


def eval_text_lengths(config: Optional[str], model) -> tuple[int, int]:
    """(max_tokens, max_words) of an evaluation command: the --config's data section, else ALBEF's
    evaluation length (30, 30); at most the model's positions."""
    max_tokens, max_words = 30, 30
    if config:
        cfg = load_config(config)
        max_tokens, max_words = cfg.data.max_tokens, cfg.data.max_words
    return min(max_tokens, model.cfg.text.max_position), max_words
