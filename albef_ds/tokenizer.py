"""Caption cleaning and tokenization (BERT WordPiece through transformers)."""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

from transformers import BertTokenizerFast

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's caption normalisation: lower-case, punctuation dropped, at most `max_words` words."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    words = _SPACES.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])


def build_tokenizer(name_or_path: str) -> BertTokenizerFast:
    """A BERT tokenizer from a hub name (`bert-base-uncased`), a local folder, or a vocab file.

    A bare file name is looked up in the package's configs folder first, so configs can name the
    shipped tiny vocabulary portably.
    """
    shipped = CONFIG_DIR / name_or_path
    if not os.path.isabs(name_or_path) and shipped.is_file():
        name_or_path = str(shipped)
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as f:
            vocab = {token: i for i, token in enumerate(line.rstrip("\n") for line in f)}
        if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:   # transformers >= 5
            return BertTokenizerFast(vocab=vocab, do_lower_case=True)
        return BertTokenizerFast(vocab_file=name_or_path, do_lower_case=True)
    return BertTokenizerFast.from_pretrained(name_or_path)


def tokenize(tokenizer: BertTokenizerFast, captions: list[str], max_length: int):
    """Pads every batch to `max_length` so that text tensors have one shape on every rank."""
    out = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return out["input_ids"], out["attention_mask"]
