"""What each kind of annotation file holds, entry by entry, checked where a file is read (training's
start-up checks, the evaluation readers, make_shards): a wrong entry stops the command in one line
naming the file, the entry's index and the key, instead of a crash where the stream or an
evaluator reaches it.

A schema maps each key to what its value must be: a text (a string), texts (a string or a
non-empty list of strings), a path (a string, or a number: SNLI-VE names Flickr30K images by id),
an id (a string or a number), a label (a string or a boolean: NLVR2's files hold JSON booleans).
"""
from __future__ import annotations

from typing import Callable


def _text(v) -> bool:
    return isinstance(v, str)


def _texts(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v))


def _scalar(v) -> bool:
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def _label(v) -> bool:
    return isinstance(v, (str, bool))


def _paths(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_scalar(x) for x in v)


KINDS: dict[Callable, str] = {_text: "a string", _texts: "a string or a list of strings",
                              _scalar: "a string or a number", _label: "a label word", _paths: "a list of paths"}

CAPTIONS = {"image": _scalar, "caption": _texts}                         # pretraining, retrieval
VQA_TRAIN = {"question": _text, "answer": _texts, "image": _scalar}
VQA_TEST = {"question_id": _scalar, "question": _text, "image": _scalar}
VQA_ANSWERS = {"answer": _texts}                                          # evaluation with answers
LABELLED = {"sentence": _text, "label": _label}                           # SNLI-VE, NLVR2 (+ images)
GROUNDING_TRAIN = {"image": _scalar, "text": _text}
GROUNDING = {**GROUNDING_TRAIN, "ref_id": _scalar}


def check_entries(entries: list, path: str, schema: dict, images: int = 0) -> None:
    """Every entry of an annotation file is a dict whose keys hold what `schema` says (ValueError
    naming the file, the entry and the key); `images` > 0: the entry names that many images
    ("images" as a list, or "image" when one)."""
    if not isinstance(entries, list):
        raise ValueError(f"{path} holds a {type(entries).__name__}, not a list of entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is a {type(entry).__name__}, not an annotation dict")
        for key, ok in schema.items():
            if key not in entry:
                raise ValueError(f"{path}: entry {i} has no '{key}' (entries have {', '.join(schema)})")
            if not ok(entry[key]):
                raise ValueError(f"{path}: entry {i}: '{key}' is {entry[key]!r}, not {KINDS[ok]}")
        if images:
            named = entry["images"] if images > 1 or "images" in entry else [entry.get("image")]
            if not _paths(named) or len(named) != images:
                key = "images" if images > 1 else "image"
                raise ValueError(f"{path}: entry {i}: '{key}' is {entry.get(key)!r}, not "
                                 + (f"a list of {images} image paths" if images > 1 else "an image path"))
