"""The engine: preflight checks, the build step, the one training loop, DeepSpeed config and
internals, logging."""
from .ds_config import resolve_ds_config
from .trainer import EXIT_REQUEUE, EXIT_TERMINATED, Trainer

__all__ = ["Trainer", "EXIT_REQUEUE", "EXIT_TERMINATED", "resolve_ds_config"]
