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


TEXTS = ["a red circle", "A Red CIRCLE on the left", "three small orange stars [SEP]", "", "héllo wörld naïve café",
         "unbelievable tokenization of squares", "数字 and 中文 mixed", "x" * 120, "what is the dog holding?",
         "red-green circle/square 50% & more", "[MASK] [CLS] [PAD] [UNK] inside", "\tcontrol\x00chars\u200b here"]


def wordpiece_vocab(tmp_path):
    """A vocabulary with word pieces (`##...`), so that words split, and the special tokens."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "on", "the", "left", "three", "small",
             "orange", "stars", "un", "##believ", "##able", "token", "##ization", "of", "square", "##s", "what", "is",
             "dog", "hold", "##ing", "?", "-", "/", "%", "&", "more", "green", "50", "x", "##x", "数", "字", "and",
             "中", "文", "mixed", "h", "##ello", "hello", "world", "naive", "cafe", "inside", "control", "chars", "here"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return str(path)


def transformers_tokenizer(vocab_file, lowercase=True):
    import inspect

    from transformers import BertTokenizerFast
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:        # transformers >= 5
        from albef_ds.tokenizer import read_vocab
        return BertTokenizerFast(vocab=read_vocab(vocab_file), do_lower_case=lowercase)
    return BertTokenizerFast(vocab_file=vocab_file, do_lower_case=lowercase)


@pytest.mark.parametrize("vocab", ["tiny", "wordpiece"])
def test_the_ids_are_transformers_bert_tokenizers(vocab, tmp_path):
    """The same ids, word ids and offsets as transformers' BertTokenizerFast on the same vocabulary
    (what the package ran before, and what ALBEF's code runs), through every call the package makes."""
    from albef_ds.tokenizer import CONFIG_DIR

    path = str(CONFIG_DIR / "tiny_vocab.txt") if vocab == "tiny" else wordpiece_vocab(tmp_path)
    ours, theirs = build_tokenizer(path), transformers_tokenizer(path)
    assert (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id, ours.mask_token_id) == (
        theirs.pad_token_id, theirs.unk_token_id, theirs.cls_token_id, theirs.sep_token_id, theirs.mask_token_id)
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    for max_length in (4, 8, 40):
        want = theirs(TEXTS, add_special_tokens=False, padding="max_length", truncation=True,
                      max_length=max_length - 1, return_tensors="pt")
        ids, mask = tokenize(ours, TEXTS, max_length)
        assert ids[:, 1:].tolist() == want["input_ids"].tolist() and mask[:, 1:].tolist() == want["attention_mask"].tolist()
        assert set(ids[:, 0].tolist()) == {theirs.cls_token_id}
        for text, encoding in zip(TEXTS, ours.encode(TEXTS, max_length - 1)):
            their = theirs(text, add_special_tokens=False, truncation=True, max_length=max_length - 1,
                           return_offsets_mapping=True)
            assert encoding.ids == their["input_ids"] and encoding.word_ids == their.word_ids()
            assert [list(o) for o in encoding.offsets] == [list(o) for o in their["offset_mapping"]]
    assert ours.convert_tokens_to_ids(["red", "nosuchword"]) == theirs.convert_tokens_to_ids(["red", "nosuchword"])
    for encoding in ours.encode(TEXTS):
        ids = [ours.cls_token_id, *encoding.ids, ours.sep_token_id, ours.pad_token_id]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    if vocab == "wordpiece":        # the vocabulary splits words: the comparison saw word pieces
        assert any(len(set(e.word_ids)) < len(e.word_ids) for e in ours.encode(TEXTS))


def test_a_transformers_folder_is_read_as_transformers_reads_it(tmp_path):
    """A folder saved by transformers (tokenizer.json) and a folder of vocab.txt whose
    tokenizer_config.json says do_lower_case false (a cased BERT) give transformers' ids."""
    vocab = wordpiece_vocab(tmp_path)
    saved = tmp_path / "saved"
    transformers_tokenizer(vocab).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file()
    cased = tmp_path / "cased"
    cased.mkdir()
    (cased / "vocab.txt").write_text(open(vocab, encoding="utf-8").read(), encoding="utf-8")
    (cased / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    for folder, theirs in ((saved, transformers_tokenizer(vocab)), (cased, transformers_tokenizer(vocab, lowercase=False))):
        ours = build_tokenizer(str(folder))
        want = theirs(TEXTS, add_special_tokens=False, padding="max_length", truncation=True, max_length=19,
                      return_tensors="pt")
        assert tokenize(ours, TEXTS, 20)[0][:, 1:].tolist() == want["input_ids"].tolist(), folder
    assert tokenize(build_tokenizer(str(cased)), ["Red"], 3)[0][0, 1] == build_tokenizer(str(cased)).unk_token_id


def test_a_tokenizer_that_cannot_be_found_is_a_config_error(tmp_path):
    from albef_ds.config import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds neither tokenizer.json nor vocab.txt"):
        build_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match=r"has no \[PAD\], \[UNK\], \[CLS\], \[SEP\], \[MASK\]"):
        build_tokenizer(str(tmp_path / "vocab.txt"))
