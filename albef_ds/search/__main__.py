"""Search an index made by `python -m albef_ds.index`, as ALBEF retrieves (ITC, then the ITM head):

    python -m albef_ds.search --index INDEX --text "a dog on a beach" [--text ...] [--k 10] [--rerank 64] [--json]
    python -m albef_ds.search --index INDEX --texts queries.txt ...        # one query per line
    python -m albef_ds.search --index INDEX --image photo.jpg ...          # image -> the collection's captions

The model is the checkpoint the index was made with (--checkpoint: the same weights elsewhere;
another model is refused). Prints a table per query, or with --json one JSON object per result
(query, rank, row, name, itc, itm, match, captions or text, source). See docs/search.md.
"""
from __future__ import annotations

import json
import sys

import torch

from albef_ds.cli import INPUT_ERRORS, ArgumentParser, read_lines, report_input_error
from albef_ds.config import ConfigError
from albef_ds.data.samples import decode_image
from albef_ds.search.loading import load_for_index
from albef_ds.search.query import Searcher, as_records
from albef_ds.search.store import open_index


def parse_args(argv=None):
    ap = ArgumentParser(prog="python -m albef_ds.search", description="ALBEF-DS: search an index")
    ap.add_argument("--index", required=True, help="a folder written by python -m albef_ds.index")
    query = ap.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", action="append", help="a text query (repeat for several)")
    query.add_argument("--texts", help="a file of text queries, one per line")
    query.add_argument("--image", help="an image file: the collection's captions that fit it best")
    ap.add_argument("--k", type=int, default=10, help="results per query")
    ap.add_argument("--rerank", type=int, default=64, help="candidates re-scored by the ITM head (0: ITC only)")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ap.add_argument("--checkpoint", default=None, help="the index's checkpoint at another path (the same weights)")
    ap.add_argument("--config", default=None, help="config to load the checkpoint into (default: the index's)")
    ap.add_argument("--nprobe", type=int, default=None, help="lists an inverted index scans per query (default: "
                    "the index's)")
    ap.add_argument("--batch_size", type=int, default=64, help="candidate images re-ranked together")
    ap.add_argument("--workers", type=int, default=4, help="threads decoding candidate images")
    ap.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    ap.add_argument("--trust_checkpoint", action="store_true", help="load a checkpoint that holds objects beyond "
                    "tensors (unpickling them could run code): only files from a source you trust")
    return ap.parse_args(argv)


def _queries(args) -> list[str]:
    if args.text is not None:
        return args.text
    return read_lines(args.texts, "--texts")


def _table(result, image_query: bool) -> str:
    t = result.timings
    cost = ", ".join(f"{k[:-3].replace('_', '+')} {v:.1f} ms" for k, v in t.items())
    lines = [f"{result.query!r}: {result.reranked} re-ranked by ITM ({cost})",
             f"{'rank':>4} {'itm':>7} {'match':>6} {'itc':>6}  {'caption' if image_query else 'image'}"]
    for h in result.hits:
        itm = f"{h.itm:7.3f} {h.match:6.3f}" if h.itm is not None else f"{'-':>7} {'-':>6}"
        what = f"{h.text}   ({h.name})" if image_query else h.name + (f"   {h.captions[0]}" if h.captions else "")
        lines.append(f"{h.rank:>4} {itm} {h.itc:6.3f}  {what}")
    return "\n".join(lines)


def run(args) -> list:

    if args.k < 1 or args.rerank < 0 or args.batch_size < 1 or args.workers < 0:
        raise ConfigError(f"--k {args.k} (>= 1), --rerank {args.rerank} (>= 0), --batch_size {args.batch_size} "
                          f"(>= 1) and --workers {args.workers} (>= 0): out of range")
    queries = _queries(args) if args.image is None else []
    image = None
    if args.image is not None:
        try:
            image = decode_image(args.image)
        except Exception as exc:              # PIL raises many types on broken files
            raise ConfigError(f"--image {args.image} cannot be read: {exc}") from None
    try:
        index = open_index(args.index)
    except ValueError as exc:
        raise ConfigError(f"--index {args.index}: {exc}") from None
    if image is not None and not index.has_texts:
        raise ConfigError(f"--image: --index {args.index} holds no captions to search (image -> text needs them)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_for_index(index, f"--index {args.index}", device, args.checkpoint, args.config, args.trust_checkpoint)
    searcher = Searcher(index, loaded, args.batch_size, args.workers, args.nprobe)
    for text in queries:                      # every query checked before the first is searched
        try:
            searcher.clean(text)
        except ValueError as exc:
            raise ConfigError(f"--text: {exc}") from None
    if image is not None:
        return [searcher.texts_for_image(image, args.k, args.rerank, args.image)]
    return [searcher.images_for_text(text, args.k, args.rerank) for text in queries]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    for result in results:
        if args.json:
            print("\n".join(json.dumps(record) for record in as_records(result)), flush=True)
        else:
            print(_table(result, args.image is not None) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
