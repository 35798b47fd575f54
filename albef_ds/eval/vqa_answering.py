"""VQA evaluated as ALBEF does it, split over ranks: every question's answer is ranked from an
answer list (VQAModel.rank_answers: the k_test likeliest first tokens, re-ranked by the whole
answer), each question answered once by one rank and the answers gathered; the VQA accuracy
(albef_ds.eval.vqa) when the questions come with the annotators' answers, and the result file of
the evaluation server, `[{"question_id": ..., "answer": ...}]`.

A question whose image cannot be read is not answered: it is reported (count and images), left
out of the result file and scored 0 in the accuracy, which stays over every question.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .. import distributed as dist
from ..config import ConfigError
from ..data.annotations import VQA_ANSWERS, VQA_TEST, check_entries
from ..data.shards import read_annotations
from ..data.vqa import answer_tokens, clean_question
from ..fileio import atomic_write
from ..tokenizer import build_tokenizer, tokenize
from .inputs import check_skipped, model_device, predict_split, skip_summary
from .vqa import accuracy_metrics

RESULT_FILE = "vqa_result.json"
QUESTION_WORDS = 50                  # ALBEF's question length at evaluation (30 in training)
NOT_ANSWERED = -1


@dataclass
class VQASet:
    """Questions with their images (file paths) and, when the files have them, the annotators'
    answers and the answer and question types."""
    question_ids: list
    questions: list
    images: list
    annotators: Optional[list] = None
    answer_types: Optional[list] = None
    question_types: Optional[list] = None


def read_vqa_set(paths: Union[str, list], image_root: Optional[str] = None) -> VQASet:
    """ALBEF's VQA annotation files (a JSON list of {"question_id", "question", "image"[, "answer",
    "answer_type", "question_type"]}), in order. Answers count when every entry has one, the types
    likewise.
    ValueError naming the file, the entry and the key that is missing."""
    entries, sources = [], []
    for path in [paths] if isinstance(paths, str) else paths:
        content = read_annotations(path)
        if not content:
            raise ValueError(f"{path} lists no questions")
        check_entries(content, path, VQA_TEST)
        entries += content
        sources.append((content, path))
    images = [os.path.join(image_root, e["image"]) if image_root else e["image"] for e in entries]
    data = VQASet([e["question_id"] for e in entries],
                  [clean_question(str(e["question"]), QUESTION_WORDS) for e in entries], images)
    if all("answer" in e for e in entries):
        for path_entries, path in sources:
            check_entries(path_entries, path, VQA_ANSWERS)
        data.annotators = [[e["answer"]] if isinstance(e["answer"], str) else list(e["answer"]) for e in entries]
    for key in ("answer_type", "question_type"):
        if all(key in e for e in entries):
            setattr(data, f"{key}s", [str(e[key]) for e in entries])
    return data


def read_answer_list(path: str) -> list[str]:
    """ALBEF's answer_list.json: a non-empty JSON list of distinct, non-empty answer strings
    (ValueError naming the file and the answer: an empty answer would be chosen for any question
    whose best answer it outscores, a duplicate splits an answer's probability in two)."""
    if not path:
        raise ValueError("no answer list given")
    if not os.path.isfile(path):
        raise ValueError(f"answer list {path}: no such file")
    with open(path) as f:
        answers = json.load(f)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answer list {path} is not a non-empty JSON list of strings")
    for i, answer in enumerate(answers):
        if not answer.strip():
            raise ValueError(f"answer list {path}: answer {i} is empty")
    seen = {}
    for i, answer in enumerate(answers):
        if answer in seen:
            raise ValueError(f"answer list {path}: answer {i} {answer!r} repeats answer {seen[answer]}")
        seen[answer] = i
    return answers


def read_vqa_inputs(data: Union[str, list], image_root: Optional[str], answer_list: str, tokenizer: str,
                    data_option: str, list_option: str, training: bool = False) -> tuple[VQASet, list[str], object]:
    """(the questions, the answer list, the tokenizer) of an evaluation; a file that is missing or
    malformed is a ConfigError naming the option that gave it (`data_option`, `list_option`).
    `training`: the evaluation of a training run, which needs the annotators' answers."""
    try:
        questions = read_vqa_set(data, image_root)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{data_option} {data}: {exc}") from None
    if training and questions.annotators is None:
        raise ConfigError(f"{data_option} {data}: an entry has no 'answer'; evaluating during training needs "
                          "the annotators' answers (a test file goes to `python -m albef_ds.evaluate vqa`)")
    try:
        answers = read_answer_list(answer_list)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{list_option}: {exc}") from None
    return questions, answers, build_tokenizer(tokenizer)


def question_tokens(tokenizer, questions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] words`, padded to the longest question (ALBEF does not truncate them at evaluation)."""
    ids, mask = tokenize(tokenizer, questions, max_length)
    longest = int(mask.sum(1).max())
    return ids[:, :longest], mask[:, :longest]


def answer_questions(model, data: VQASet, answer_list: list[str], tokenizer, img_size: int, k_test: int,
                     batch_size: int = 64, split_ranks: Optional[bool] = None) -> list[int]:
    """The index in `answer_list` of every question's answer (NOT_ANSWERED where its image could not
    be read), the same on every rank of the split: batches of questions are dealt to the ranks
    (albef_ds.distributed) and the answers gathered."""
    device = model_device(model)
    max_length = model.cfg.text.max_position
    answer_ids, answer_mask = (t.to(device) for t in answer_tokens(tokenizer, answer_list, max_length))

    def answer(slots: list, items: list) -> torch.Tensor:
        ids, mask = question_tokens(tokenizer, [data.questions[i] for i in items], max_length)
        ids, mask = ids.to(device), mask.to(device)
        states = model.question_states(slots[0], ids, mask)
        return model.rank_answers(states, mask, answer_ids, answer_mask, k_test)[0][:, 0]

    images = [[image] for image in data.images]
    return predict_split(model, images, img_size, batch_size, answer, NOT_ANSWERED, split_ranks).tolist()


def evaluate_vqa(model, data: VQASet, answer_list: list[str], tokenizer, img_size: int, k_test: int = 128,
                 batch_size: int = 64, result_file: Optional[str] = None, split_ranks: Optional[bool] = None,
                 max_skipped: float = 0.0, max_skipped_option: str = "--max_skipped") -> dict:
    """Answers every question (a collective over the split, default all ranks of the process group)
    and returns, the same on every rank: questions, answered, skipped (questions whose image could
    not be read, each in skipped_items), k_test, and with the annotators' answers the VQA accuracy
    ("acc", "acc_<type>" per answer type, "per_question_type"). More skipped than `max_skipped`
    allows is a ConfigError (check_skipped) before anything is written; then rank 0 writes
    `result_file` (the server's format), replacing an older one only whole."""
    picked = answer_questions(model, data, answer_list, tokenizer, img_size, k_test, batch_size, split_ranks)
    answers = [answer_list[i] if i != NOT_ANSWERED else None for i in picked]
    skipped = [f"question {q}: image {image} unreadable" for q, image, answer
               in zip(data.question_ids, data.images, answers) if answer is None]
    out = {"questions": len(answers), "answered": len(answers) - len(skipped),
           "k_test": min(k_test, len(answer_list)), "answer_list": len(answer_list),
           **skip_summary(len(answers), skipped)}
    check_skipped(out, max_skipped, max_skipped_option)
    if data.annotators is not None:
        out.update(accuracy_metrics(answers, data.annotators, data.answer_types, data.question_types))
    if result_file is not None and dist.rank() == 0:
        result = [{"question_id": q, "answer": a} for q, a in zip(data.question_ids, answers) if a is not None]
        atomic_write(result_file, lambda tmp: Path(tmp).write_text(json.dumps(result)))
        out["result_file"] = result_file
    return out


class VQAEvaluator:
    """The VQA evaluation of a training run: eval.data (annotation files with the annotators'
    answers, images under eval.image_root) and the answer list, read when the run starts (a missing
    or malformed one is a ConfigError then). A collective: every rank calls it with the model and
    gets the same metrics; the latest answers go to <output_dir>/vqa_result.json."""
    metrics = ("acc",)
    headline = ("acc", "acc_yes_no", "acc_number", "acc_other", "skipped")

    def __init__(self, cfg, answer_list: str, output_dir: str):
        """`answer_list`: the task's vqa.answer_list."""
        self.cfg = cfg
        e = cfg.eval
        if not e.data:
            raise ConfigError("VQA evaluation needs eval.data: VQA annotation files with answers (and eval.image_root)")
        self.data, self.answer_list, self.tokenizer = read_vqa_inputs(
            e.data, e.image_root or None, answer_list, cfg.model.text.tokenizer, "eval.data",
            "vqa.answer_list", training=True)
        self.result_file = os.path.join(output_dir, RESULT_FILE)

    def __call__(self, model) -> dict:
        e = self.cfg.eval
        return evaluate_vqa(model, self.data, self.answer_list, self.tokenizer, self.cfg.model.vision.img_size,
                            e.k_test, e.batch_size, self.result_file, max_skipped=e.max_skipped,
                            max_skipped_option="eval.max_skipped")
