"""A web page over one or more indexes: search by text (ITC, then the ITM head), the per-word
Grad-CAM of the query over a result, and questions about an uploaded image with a VQA checkpoint:

    python -m albef_ds.serve --index INDEX [--index NAME=INDEX ...] [--vqa CKPT --answer_list FILE]
        [--host 127.0.0.1] [--port 8000] [--checkpoint PATH] [--max_upload_mb 8] [--device cpu|cuda]

The server runs one ALBEF model: --checkpoint, else the first index's; an index made by another
model is listed but refused (HTTP 409). The JSON API under the page is in albef_ds/search/web.py
and docs/search.md. Binds to the loopback interface unless --host says otherwise.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import sys

import torch
import uvicorn

from albef_ds.cli import INPUT_ERRORS, ArgumentParser, report_input_error
from albef_ds.config import ConfigError
from albef_ds.eval.vqa_answering import read_answer_list
from albef_ds.hub import load_model
from albef_ds.models.vqa import VQAModel
from albef_ds.search.answers import QuestionAnswerer
from albef_ds.search.loading import check_model, load_for_index, load_search_model
from albef_ds.search.query import Searcher
from albef_ds.search.store import open_index
from albef_ds.search.web import Limits, ServedIndex, create_app


def parse_args(argv=None):
    ap = ArgumentParser(prog="python -m albef_ds.serve", description="ALBEF-DS: the search page")
    ap.add_argument("--index", action="append", required=True, metavar="[NAME=]FOLDER",
                    help="an index folder (repeat for several; NAME defaults to the folder's name)")
    ap.add_argument("--checkpoint", default=None, help="the model to search with (default: the first index's)")
    ap.add_argument("--config", default=None, help="config to load --checkpoint into (default: the index's)")
    ap.add_argument("--vqa", default=None, help="a VQA checkpoint: answers questions about uploaded images")
    ap.add_argument("--answer_list", default=None, help="ALBEF's answer_list.json: the answers --vqa ranks")
    ap.add_argument("--k_test", type=int, default=128, help="VQA: answers whose first token is likeliest, re-scored")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--rerank", type=int, default=64, help="default re-ranking depth of a search")
    ap.add_argument("--max_upload_mb", type=float, default=8.0, help="largest upload accepted")
    ap.add_argument("--max_pixels", type=int, default=40_000_000, help="largest uploaded image decoded (pixels)")
    ap.add_argument("--workers", type=int, default=4, help="threads decoding candidate images")
    ap.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    ap.add_argument("--trust_checkpoint", action="store_true", help="load checkpoints that hold objects beyond "
                    "tensors (unpickling them could run code): only files from a source you trust")
    return ap.parse_args(argv)


def _named(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, folder = value.split("=", 1) if "=" in value and not os.path.isdir(value) else (None, value)
        out.append((name or os.path.basename(os.path.normpath(folder)), folder))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--index: two indexes named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                          "name them: --index NAME=FOLDER")
    return out


def _check_address(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a port number")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def build_app(args):
    """The application of the command line's arguments (every check done before it is served)."""

    if args.max_upload_mb <= 0 or args.max_pixels <= 0 or args.rerank < 0 or args.k_test < 1:
        raise ConfigError("--max_upload_mb, --max_pixels and --k_test must be > 0, --rerank >= 0")
    if args.vqa is not None and args.answer_list is None:
        raise ConfigError("--vqa needs --answer_list: the answers (ALBEF's answer_list.json) the model ranks")
    opened = []
    for name, folder in _named(args.index):
        try:
            opened.append((name, folder, open_index(folder)))
        except ValueError as exc:
            raise ConfigError(f"--index {folder}: {exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    first_name, first_folder, first = opened[0]
    if args.checkpoint is None:
        loaded = load_for_index(first, f"--index {first_folder}", device, config=args.config,
                                trusted=args.trust_checkpoint)
    else:
        loaded = load_search_model(args.checkpoint, args.config or first.manifest["checkpoint"]["config"], device,
                                   args.trust_checkpoint)
    served = []
    for name, folder, index in opened:
        entry = ServedIndex(name, folder, index.manifest["counts"]["images"], index.manifest["counts"]["texts"])
        try:
            check_model(index, f"index {name!r}", loaded)
            lengths = {"max_tokens": index.plan["max_tokens"], "max_words": index.plan["max_words"]}
            entry.searcher = Searcher(index, dataclasses.replace(loaded, **lengths), workers=args.workers)
        except ConfigError as exc:
            entry.problem = str(exc)
            print(f"warning: {exc}", file=sys.stderr, flush=True)
        served.append(entry)
    if all(s.searcher is None for s in served):
        raise ConfigError(f"no --index was made by {loaded.record['path']}: nothing to search")
    answerer = _answerer(args, device) if args.vqa else None
    limits = Limits(int(args.max_upload_mb * (1 << 20)), args.max_pixels, args.rerank)
    return create_app(served, answerer, limits), served


def _answerer(args, device):
    try:
        answers = read_answer_list(args.answer_list)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--answer_list: {exc}") from None
    model = load_model(args.vqa, device=device, trusted=args.trust_checkpoint)
    if not isinstance(model, VQAModel):
        raise ConfigError(f"--vqa {args.vqa} holds a {type(model).__name__}, not a VQA model")
    return QuestionAnswerer(model, answers, args.k_test)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _check_address(args.host, args.port)
        app, served = build_app(args)
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: listening on {args.host}: whoever reaches this machine can use the page", file=sys.stderr)
    usable = [s for s in served if s.searcher is not None]
    print(f"serving {', '.join(f'{s.name} ({s.images} images)' for s in usable)} at http://{args.host}:{args.port}/ "
          f"(VQA {'on' if args.vqa else 'off'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
