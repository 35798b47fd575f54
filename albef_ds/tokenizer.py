"""Caption cleaning and tokenization (BERT's uncased WordPiece), as ALBEF's recipe has them:
released checkpoints were trained and are evaluated on exactly these inputs.

The tokenizer is the pipeline transformers' BertTokenizerFast builds (BERT's normaliser and
pre-tokenizer, WordPiece, the special tokens matched whole), run by the `tokenizers` library that
class wraps: the same ids, without importing transformers, which costs most of a second at the
start of every command (tests/unit/test_tokenizer.py holds the two to the same output)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Encoding, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .config import ConfigError
from .fileio import hub_cache_only

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

DELETED_CHARACTERS = re.compile(r"[,.'!?\"()*#:;~]")      # deleted, not replaced: "man's" -> "mans"
_SPACE_RUNS = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's caption normalisation: lower-case; `,.'!?"()*#:;~` deleted; `-` and `/` become
    spaces, `<person>` "person"; runs of spaces collapsed; at most `max_words` words. Every
    other symbol stays (the tokenizer splits it off)."""
    text = DELETED_CHARACTERS.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    words = _SPACE_RUNS.sub(" ", text).rstrip("\n").strip(" ").split(" ")
    return " ".join(words[:max_words])


class BertTokenizer:
    """BERT's WordPiece tokenizer: token ids of texts, without special tokens added (the callers
    place [CLS] and [SEP]; a [SEP] written in a text is read as the token), and the special ids."""

    def __init__(self, backend: Tokenizer, source: str):
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        vocab = backend.get_vocab()
        missing = [token for token in SPECIAL_TOKENS if token not in vocab]
        if missing:
            raise ConfigError(f"tokenizer '{source}' has no {', '.join(missing)} in its vocabulary")
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = (
            vocab[token] for token in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab()

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        ids = (self.backend.token_to_id(token) for token in tokens)
        return [self.unk_token_id if i is None else i for i in ids]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids) -> str:
        """The text of token ids, the special tokens left out and word pieces joined."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode(self, texts: list[str], max_length: Optional[int] = None) -> list[Encoding]:
        """Each text's encoding (ids, word_ids, offsets), cut to `max_length` tokens if given."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        if max_length is not None:
            for encoding in encodings:
                encoding.truncate(max_length)
        return encodings


def wordpiece(vocab: dict[str, int], lowercase: bool = True) -> Tokenizer:
    """The pipeline BertTokenizerFast builds from a vocabulary."""
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([token for token in SPECIAL_TOKENS if token in vocab])
    return backend


def read_vocab(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {token: i for i, token in enumerate(line.rstrip("\n") for line in f)}


def build_tokenizer(name_or_path: str) -> BertTokenizer:
    """A BERT tokenizer from a vocab file, a local folder (a transformers tokenizer: its
    tokenizer.json, or its vocab.txt with tokenizer_config.json's do_lower_case) or a hub name
    (`bert-base-uncased`: its tokenizer.json, fetched by `tokenizers` through huggingface_hub; from
    the local cache alone where the hub cannot be reached).

    A bare file name is looked up in the package's configs folder first, so configs can name the
    shipped tiny vocabulary portably.
    """
    shipped = CONFIG_DIR / name_or_path
    if not os.path.isabs(name_or_path) and shipped.is_file():
        name_or_path = str(shipped)
    if os.path.isfile(name_or_path):
        return BertTokenizer(wordpiece(read_vocab(name_or_path)), name_or_path)
    if os.path.isdir(name_or_path):
        whole = os.path.join(name_or_path, "tokenizer.json")
        if os.path.isfile(whole):
            return BertTokenizer(Tokenizer.from_file(whole), name_or_path)
        vocab, settings = os.path.join(name_or_path, "vocab.txt"), os.path.join(name_or_path, "tokenizer_config.json")
        if not os.path.isfile(vocab):
            raise ConfigError(f"tokenizer folder {name_or_path} holds neither tokenizer.json nor vocab.txt")
        lowercase = True
        if os.path.isfile(settings):
            with open(settings, encoding="utf-8") as f:
                lowercase = json.load(f).get("do_lower_case", True)
        return BertTokenizer(wordpiece(read_vocab(vocab), lowercase), name_or_path)
    unreachable = hub_cache_only()
    try:
        return BertTokenizer(Tokenizer.from_pretrained(name_or_path), name_or_path)
    except Exception as exc:      # the hub client raises its own kinds (offline, unknown name)
        if unreachable:
            raise ConfigError(f"tokenizer '{name_or_path}' is neither a vocab file nor a folder, nor in the "
                              f"Hugging Face cache, and the hub cannot be reached ({unreachable})") from None
        raise ConfigError(f"tokenizer '{name_or_path}' is neither a vocab file nor a folder, and the hub "
                          f"could not give it: {type(exc).__name__}: {exc}") from None


def tokenize(tokenizer: BertTokenizer, captions: list[str], max_length: int):
    """(input_ids, attention_mask) [N, max_length]: `[CLS] w1 ... wn` and padding, with NO trailing
    `[SEP]`, as ALBEF's tokenizer writes a single sentence (text that needs one, a VQA answer,
    carries "[SEP]" itself). Every batch is padded to `max_length` so that text tensors have one
    shape on every rank."""
    ids = torch.full((len(captions), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(captions), max_length, dtype=torch.long)
    ids[:, 0], mask[:, 0] = tokenizer.cls_token_id, 1
    for row, encoding in enumerate(tokenizer.encode(captions, max_length - 1)):
        ids[row, 1:1 + len(encoding.ids)] = torch.tensor(encoding.ids, dtype=torch.long)
        mask[row, 1:1 + len(encoding.ids)] = 1
    return ids, mask


def words_past(tokenizer: BertTokenizer, text: str, max_tokens: int) -> int:
    """How many words of a cleaned text lie (wholly or in part) past the first max_tokens tokens
    ([CLS] and max_tokens - 1 word pieces): what the model does not read of it."""
    word_of = tokenizer.encode([text])[0].word_ids
    words = len(text.split(" "))
    if len(word_of) <= max_tokens - 1:
        return 0
    return words - word_of[max_tokens - 1]
