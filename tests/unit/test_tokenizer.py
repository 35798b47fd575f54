"""Captions and tokens as ALBEF's recipe writes them (released checkpoints expect exactly these)."""
import pytest

from albef_ds.tokenizer import build_tokenizer, clean_caption, tokenize

TOKENIZER = build_tokenizer("tiny_vocab.txt")


@pytest.mark.parametrize("raw, cleaned", [
    ("A man's Dog!", "a mans dog"),                          # deleted, not replaced by a space
    ("red-green  circle/square", "red green circle square"),  # - and / become spaces; runs collapse
    ('"Two (small) stars*" #3: ok; fine~', "two small stars 3 ok fine"),
    ("50% & more + <person>", "50% & more + person"),      # other symbols stay
    ("  padded text \n", "padded text"),
])
def test_captions_are_cleaned_as_albef_cleans_them(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_max_words_keeps_the_first_words():
    assert clean_caption("one two three four five", max_words=3) == "one two three"


def test_a_sentence_is_cls_then_words_without_a_trailing_sep():
    vocab = TOKENIZER.get_vocab()
    ids, mask = tokenize(TOKENIZER, ["a red circle", "a red circle [SEP]", ""], 6)
    cls, sep, pad = TOKENIZER.cls_token_id, TOKENIZER.sep_token_id, TOKENIZER.pad_token_id
    words = [vocab["a"], vocab["red"], vocab["circle"]]
    assert ids.tolist() == [[cls, *words, pad, pad], [cls, *words, sep, pad], [cls] + [pad] * 5]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    ids, mask = tokenize(TOKENIZER, ["a red circle on the left"], 4)      # truncated after [CLS] + 3
    assert ids.tolist() == [[cls, *words]] and mask.tolist() == [[1, 1, 1, 1]]
