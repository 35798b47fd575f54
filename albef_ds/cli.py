"""What every command line does with an input it cannot use: one line naming the file, key or
value, printed once (rank 0), exit status 2, no traceback. Unexpected errors keep theirs."""
from __future__ import annotations

import sys

from .config import ConfigError
from .io import ConversionError

# A configuration or input that cannot be used (a ConfigError names the key or file; a
# ConversionError the checkpoint file, tag or key).
INPUT_ERRORS = (ConfigError, ConversionError)
EXIT_INPUT_ERROR = 2


def report_input_error(exc: Exception) -> int:
    """Prints `exc` on one line (on rank 0 only, while a process group is up) and returns the exit status."""
    from . import distributed

    if distributed.rank() == 0:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
    return EXIT_INPUT_ERROR
