"""What every command line shares: an input it cannot use is one line naming the file, key or
value, printed once (rank 0), exit status 2, no traceback (unexpected errors keep theirs); the
process group a command runs in; the text lengths of evaluation commands."""
from __future__ import annotations

import sys
from typing import Callable, Optional

from . import distributed
from .config import ConfigError, load_config
from .fileio import ConversionError

# A configuration or input that cannot be used (a ConfigError names the key or file; a
# ConversionError the checkpoint file, tag or key).
INPUT_ERRORS = (ConfigError, ConversionError)
EXIT_INPUT_ERROR = 2


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


def eval_text_lengths(config: Optional[str], model) -> tuple[int, int]:
    """(max_tokens, max_words) of an evaluation command: the --config's data section, else ALBEF's
    evaluation length (30, 30); at most the model's positions."""
    max_tokens, max_words = 30, 30
    if config:
        cfg = load_config(config)
        max_tokens, max_words = cfg.data.max_tokens, cfg.data.max_words
    return min(max_tokens, model.cfg.text.max_position), max_words
