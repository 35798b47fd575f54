"""Caption cleaning and tokenization (BERT WordPiece through transformers), as ALBEF's recipe has
them: released checkpoints were trained and are evaluated on exactly these inputs."""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DELETED_CHARACTERS = re.compile(r"[,.'!?\"()*#:;~]")      # deleted, not replaced: "man's" -> "mans"
_SPACE_RUNS = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's caption normalisation: lower-case; `,.'!?"()*#:;~` deleted; `-` and `/` become
    spaces, `<person>` "person"; runs of spaces collapsed; at most `max_words` words. Every
    other symbol stays (the tokenizer splits it off)."""
    text = DELETED_CHARACTERS.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    words = _SPACE_RUNS.sub(" ", text).rstrip("\n").strip(" ").split(" ")
    return " ".join(words[:max_words])


def build_tokenizer(name_or_path: str) -> "BertTokenizerFast":
    """A BERT tokenizer from a hub name (`bert-base-uncased`), a local folder, or a vocab file.

    A bare file name is looked up in the package's configs folder first, so configs can name the
    shipped tiny vocabulary portably.
    """
    # imported here: transformers takes most of a second to import, which every command would
    # otherwise pay before it can check its arguments (a mistake is reported before any work)
    from transformers import BertTokenizerFast

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


def tokenize(tokenizer: "BertTokenizerFast", captions: list[str], max_length: int):
    """(input_ids, attention_mask) [N, max_length]: `[CLS] w1 ... wn` and padding, with NO trailing
    `[SEP]`, as ALBEF's tokenizer writes a single sentence (text that needs one, a VQA answer,
    carries "[SEP]" itself). Every batch is padded to `max_length` so that text tensors have one
    shape on every rank."""
    out = tokenizer(captions, add_special_tokens=False, padding="max_length", truncation=True,
                    max_length=max_length - 1, return_tensors="pt")
    n = out["input_ids"].shape[0]
    ids = torch.cat([torch.full((n, 1), tokenizer.cls_token_id), out["input_ids"]], 1)
    mask = torch.cat([torch.ones(n, 1, dtype=out["attention_mask"].dtype), out["attention_mask"]], 1)
    return ids, mask


def words_past(tokenizer, text: str, max_tokens: int) -> int:
    """How many words of a cleaned text lie (wholly or in part) past the first max_tokens tokens
    ([CLS] and max_tokens - 1 word pieces): what the model does not read of it."""
    pieces = tokenizer(text, add_special_tokens=False)
    word_of = pieces.word_ids()
    words = len(text.split(" "))
    if len(word_of) <= max_tokens - 1:
        return 0
    return words - word_of[max_tokens - 1]
