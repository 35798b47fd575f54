"""File helpers used by every room: atomic writes, reading torch files, telling file kinds apart,
and files named on the Hugging Face hub where the hub cannot be reached."""
from __future__ import annotations

import functools
import os
import pickle
import re
import socket
import struct
import tempfile
import urllib.parse
import zipfile
from typing import Optional

import torch


class ConversionError(ValueError):
    """A checkpoint that cannot be read or converted (missing, empty, truncated, of an unknown kind,
    incomplete, of another shape); the message names the path, tag or key."""


def atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary name next to `path`, then rename: a reader sees the old file or
    the complete new one, never a partial one (also when the writer dies half-way)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8


def check_readable(path: str) -> None:
    """Missing or truncated files stop here, named, before DeepSpeed or torch.load get to them."""
    if not os.path.isfile(path):
        raise ConversionError(f"missing file: {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"empty file: {path}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ConversionError(f"unreadable (truncated?) file: {path}: {exc}") from None
    elif starts_with(path, b"PK\x03\x04"):
        raise ConversionError(f"truncated file: {path} (a torch archive without its end)")


TRUST_HINT = ("only if you trust its source, load it anyway: --trust_checkpoint on the command line, "
              "trusted=True in Python, model.trust_init_checkpoint=true for model.init_checkpoint")


def torch_load(path: str, trusted: bool = False, allowed: tuple = ()):
    """A torch file on the CPU (memory-mapped when it is a zip archive), unpickled weights-only:
    tensors and plain containers, plus the classes in `allowed`. A file that needs anything else
    (unpickling it could run code) is refused with a ConversionError naming it, unless `trusted`.
    The released ALBEF files (the official scripts' save_obj: state dicts of the model, optimizer
    and lr scheduler, the config dict, the epoch) need nothing else."""
    check_readable(path)
    mmap = zipfile.is_zipfile(path)
    if not mmap and not starts_with(path, b"\x80"):      # neither torch's zip nor its legacy pickle
        raise ConversionError(f"cannot read {path}: neither a torch file nor a safetensors file")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise ConversionError(f"cannot read {path}: UnpicklingError: {exc}") from None
        needed = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        raise ConversionError(f"{path} holds objects beyond tensors and plain containers "
                              f"({needed[0] if needed else 'a Python object'}), which could run code "
                              f"when loaded: refused; {TRUST_HINT}") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError ... on bad files
        raise ConversionError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


# ---- files named on the Hugging Face hub ---------------------------------------------------------

HUB_PROBE_SECONDS = 3.0


@functools.cache               # asked once per process
def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached from here (None when it can): HF_HUB_OFFLINE is
    set, or no connection to its endpoint opens within HUB_PROBE_SECONDS (a compute node without
    internet)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname}:{port} cannot be reached: {exc.strerror or exc}"
    return None


def hub_cache_only() -> Optional[str]:
    """Call before anything asks the hub for a file (tokenizers, transformers, timm): where the hub
    cannot be reached, its client reads the local cache alone from then on, in this process and
    the ones it starts, and the reason is returned. Otherwise the client would retry every file
    for about 30 s, printing each retry, before it looked in its cache."""
    reason = hub_unreachable()
    if reason is not None:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True      # what HF_HUB_OFFLINE=1 sets; the three libraries read it per call
        os.environ["HF_HUB_OFFLINE"] = "1"
    return reason


def hub_cached(repo_id: str, filename: str) -> bool:
    """Whether the local Hugging Face cache holds `filename` of `repo_id` (its main revision)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)
