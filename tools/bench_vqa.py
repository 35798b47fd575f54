#!/usr/bin/env python
"""VQA benchmark: what the answer decoder costs per question in training and what ALBEF's answer
ranking costs per question in evaluation.

    python tools/bench_vqa.py --config vqa --batch 32 --json vqa_bench.json          # GPU: bf16
    python tools/bench_vqa.py --config tiny_vqa --batch 16 --threads 2 --full_list    # CPU

On random weights and random inputs of the recipe's shapes (questions of data.max_tokens with a
third padding, `--answers` answers per question of 1-3 word pieces, an answer list of
`--answer_list` such answers), after `--warmup` repeats, the mean over `--repeats` of:
  - train_step: the training model's forward and backward (momentum teacher included) per question;
  - decoder_train: the decoder's part of it (the answers' forward, loss and backward, the question
    states given) per question;
  - question_encoding: the image and question encoders, per question (evaluation);
  - ranking: rank_answers with the k_test cut per question (the question states given);
  - ranking_full_list (--full_list): every answer of the list through the whole decoder, what the
    cut saves.
Prints a table, writes JSON.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from albef_ds.cli import INPUT_ERRORS, ArgumentParser, report_input_error
from albef_ds.config import load_config
from albef_ds.tasks import objectives
from albef_ds.tasks.base import StepContext
from albef_ds.tasks.vqa import VQATrainingModel


def parse_args(argv=None):
    ap = ArgumentParser(description="VQA decoder and answer-ranking benchmark")
    ap.add_argument("--config", default="vqa")
    ap.add_argument("--batch", type=int, default=32, help="questions per batch")
    ap.add_argument("--answers", type=int, default=3, help="answers per question in training")
    ap.add_argument("--answer_list", type=int, default=3128, help="answers ranked in evaluation")
    ap.add_argument("--k_test", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full_list", action="store_true", help="also rank with every answer through the decoder")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: keep)")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args(argv)


def random_answers(n: int, vocab: int, cls: int, sep: int, pad: int, g: torch.Generator):
    """[CLS] 1-3 random word pieces [SEP], padded to the longest: ids and mask [n, 5]."""
    lengths = torch.randint(1, 4, (n,), generator=g)
    ids = torch.full((n, 5), pad)
    ids[:, 0] = cls
    ids[:, 1:4] = torch.randint(10, vocab, (n, 3), generator=g)
    positions = torch.arange(5)[None]
    ids = torch.where(positions <= lengths[:, None], ids, pad)
    ids[torch.arange(n), lengths + 1] = sep
    return ids, (positions <= lengths[:, None] + 1).long()


def timed(fn, warmup: int, repeats: int, gpu: bool) -> float:
    for _ in range(warmup):
        fn()
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if gpu else "cpu"), torch.bfloat16 if gpu else torch.float32
    cfg = load_config(args.config, ["model.init_checkpoint=null", "model.vision.pretrained=null",
                                    "model.text.pretrained=null", *args.overrides])
    t, size, b = cfg.model.text, cfg.model.vision.img_size, args.batch
    g = torch.Generator().manual_seed(0)
    model = VQATrainingModel(cfg.model).to(device, dtype).train()
    length = cfg.data.max_tokens
    ids = torch.randint(10, t.vocab_size, (b, length), generator=g)
    ids[:, 0] = t.cls_token_id
    mask = torch.ones_like(ids)
    mask[:, length * 2 // 3:] = 0
    answer_ids, answer_mask = random_answers(b * args.answers, t.vocab_size, t.cls_token_id, t.sep_token_id,
                                             t.pad_token_id, g)
    batch = {"image": torch.randn(b, 3, size, size, generator=g), "input_ids": ids, "attention_mask": mask,
             "answer_ids": answer_ids, "answer_mask": answer_mask,
             "answer_weight": torch.full((b * args.answers,), 1.0 / args.answers),
             "answer_question": torch.arange(b).repeat_interleave(args.answers)}
    batch = {k: v.to(device) for k, v in batch.items()}
    list_ids, list_mask = (x.to(device) for x in random_answers(args.answer_list, t.vocab_size, t.cls_token_id,
                                                                  t.sep_token_id, t.pad_token_id, g))
    ctx = StepContext(step=10**6, steps_per_epoch=1)           # alpha at its value: the teacher runs

    def train_step():
        model.zero_grad(set_to_none=True)
        loss, _ = model(batch, ctx)
        loss.backward()

    images = batch["image"].to(dtype)                          # the evaluation's input: the model's dtype
    with torch.no_grad():
        states = model.question_states(images, batch["input_ids"], batch["attention_mask"])
    states = states.detach().requires_grad_(True)

    def decoder_train():
        model.zero_grad(set_to_none=True)
        logits, targets, answer = model.answer_logits(states, batch["attention_mask"], batch["answer_ids"],
                                                      batch["answer_mask"], batch["answer_question"])
        per_answer = objectives.answer_losses(logits, targets, answer, answer_ids.shape[0])
        objectives.vqa_loss(per_answer, batch["answer_weight"], b).backward()

    result = {"config": args.config, "device": torch.cuda.get_device_name() if gpu else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "batch": b,
              "answers_per_question": args.answers, "answer_list": args.answer_list, "k_test": args.k_test,
              "img_size": size, "question_tokens": length}
    per_question = {"train_step": timed(train_step, args.warmup, args.repeats, gpu) / b,
                    "decoder_train": timed(decoder_train, args.warmup, args.repeats, gpu) / b}
    model.eval()
    with torch.no_grad():
        per_question["question_encoding"] = timed(
            lambda: model.question_states(images, batch["input_ids"], batch["attention_mask"]),
            args.warmup, args.repeats, gpu) / b
        frozen = states.detach()
        per_question["ranking"] = timed(
            lambda: model.rank_answers(frozen, batch["attention_mask"], list_ids, list_mask, args.k_test),
            args.warmup, args.repeats, gpu) / b
        if args.full_list:
            per_question["ranking_full_list"] = timed(
                lambda: model.rank_answers(frozen, batch["attention_mask"], list_ids, list_mask, args.answer_list),
                args.warmup, args.repeats, gpu) / b
    result["seconds_per_question"] = per_question
    if gpu:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    print(f"{args.config} on {result['device']} ({result['dtype']}, {result['threads']} threads), batch {b}, "
          f"{args.answers} answers/question, answer list {args.answer_list}, k_test {args.k_test}:")
    for name, seconds in per_question.items():
        print(f"  {name:<20} {seconds * 1e3:10.3f} ms per question")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except INPUT_ERRORS as exc:          # a bad option, config or file: one line, exit 2
        sys.exit(report_input_error(exc))
