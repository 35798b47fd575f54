"""The standard VQA accuracy (the VQA v2 evaluation tools' metric, which the evaluation server runs).

A predicted answer, normalised (punctuation, number words, articles, contractions), scores
min(#annotators who gave it / 3, 1); that score is averaged over the ten subsets of nine
annotators (each leaving one out). The annotators' answers are only stripped of punctuation, and
only when they disagree (the official annotations are normalised already). Pure functions.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

# Deleted where it touches a space (or when the text has a digit-comma-digit), else a space.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern as written: its "(?!<=\d)" is a look-ahead (not a look-behind), so every
# period not followed by a digit goes; and re.UNICODE lands in sub()'s `count`, so 32 at most.
_PERIODS = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_LIMIT = int(re.UNICODE)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# The official table, as it is (some keys can never match a lower-cased word; one maps the other way).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
ANNOTATORS_FOR_FULL_SCORE = 3


def process_punctuation(text: str) -> str:
    """The official punctuation step; the tests of each symbol read the text as it came in."""
    out = text
    digits_comma = _COMMA_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digits_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIODS.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower-case words; number words to digits; articles dropped; contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_prediction(answer: str) -> str:
    """A predicted answer as the metric compares it."""
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def question_accuracy(prediction: Optional[str], annotators: list[str]) -> float:
    """The score in [0, 1] of one predicted answer (None: no answer, 0) against the annotators'
    answers: min(matches among the others / 3, 1), averaged over leaving out each annotator."""
    if prediction is None or not annotators:
        return 0.0
    predicted = normalize_prediction(prediction)
    if len(set(annotators)) > 1:
        annotators = [process_punctuation(a) for a in annotators]
    matches = sum(a == predicted for a in annotators)
    return sum(min(1.0, (matches - (a == predicted)) / ANNOTATORS_FOR_FULL_SCORE)
               for a in annotators) / len(annotators)


def metric_name(answer_type: str) -> str:
    """acc_<answer type>, the type's non-alphanumeric runs as '_' ("yes/no" -> acc_yes_no)."""
    return "acc_" + re.sub(r"[^0-9a-zA-Z]+", "_", answer_type).strip("_")


def accuracy_metrics(predictions: list, annotators: list[list[str]], answer_types: Optional[list[str]] = None,
                     question_types: Optional[list[str]] = None) -> dict:
    """{"acc": overall, "acc_<type>": per answer type, "per_question_type": {type: acc}} (the types
    when given), in percent, over every question (a prediction of None scores 0)."""
    scores = [question_accuracy(p, a) for p, a in zip(predictions, annotators, strict=True)]
    out = {"acc": 100.0 * sum(scores) / len(scores)}
    if answer_types is not None:
        out.update({metric_name(kind): acc for kind, acc in _by_type(scores, answer_types).items()})
    if question_types is not None:
        out["per_question_type"] = _by_type(scores, question_types)
    return out


def _by_type(scores: list[float], types: list[str]) -> dict:
    by_type = defaultdict(list)
    for score, kind in zip(scores, types, strict=True):
        by_type[kind].append(score)
    return {kind: 100.0 * sum(s) / len(s) for kind, s in sorted(by_type.items())}
