"""One question about one image answered by a VQA checkpoint, as VQA evaluation answers
(albef_ds.eval.vqa_answering): the question cleaned and encoded with the image, the answer list
ranked by VQAModel.rank_answers (the k likeliest first tokens, re-scored by the whole answer),
the top answers with their probabilities over the k candidates."""
from __future__ import annotations

import torch
from PIL import Image

from ..data.transforms import EvalTransform
from ..data.vqa import answer_tokens, clean_question
from ..eval.inputs import model_device
from ..eval.vqa_answering import QUESTION_WORDS, question_tokens
from ..tokenizer import build_tokenizer


class QuestionAnswerer:
    def __init__(self, model, answer_list: list[str], k_test: int = 128):
        self.model, self.answer_list, self.k_test = model.eval(), answer_list, k_test
        self.tokenizer = build_tokenizer(model.cfg.text.tokenizer)
        self.device = model_device(model)
        self.max_length = model.cfg.text.max_position
        self.answer_ids, self.answer_mask = (t.to(self.device) for t in
                                             answer_tokens(self.tokenizer, answer_list, self.max_length))

    @torch.no_grad()
    def answer(self, image: Image.Image, question: str, top: int = 5) -> list[dict]:
        """[{"answer", "probability"}] best first, at most `top`. ValueError for a question that
        is empty once cleaned."""
        cleaned = clean_question(question, QUESTION_WORDS).strip()
        if not cleaned:
            raise ValueError(f"the question {question!r} is empty once cleaned (lower case, no punctuation)")
        ids, mask = question_tokens(self.tokenizer, [cleaned], self.max_length)
        pixels = EvalTransform(self.model.cfg.vision.img_size)(image.convert("RGB"))[None].to(self.device)
        states = self.model.question_states(pixels, ids.to(self.device), mask.to(self.device))
        picked, probs = self.model.rank_answers(states, mask.to(self.device), self.answer_ids, self.answer_mask,
                                                self.k_test)
        return [{"answer": self.answer_list[i], "probability": p}
                for i, p in zip(picked[0, :top].tolist(), probs[0, :top].tolist())]
