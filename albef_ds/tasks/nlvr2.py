"""NLVR2 fine-tuning: is a sentence true of a pair of images? ALBEF's recipe: the fusion layers
doubled (each pretrained fusion layer initialises a pair, attending image 0 then image 1, their
cross-attention keys and values shared), a 2-way MLP head on the fused [CLS], cross-entropy with
momentum distillation (alpha ramped over the first epoch), the best dev accuracy kept. It starts
from the text-assignment pre-step (tasks/nlvr2_ta.py) or straight from a pretrained checkpoint.
The rest is SNLI-VE's (tasks/snli_ve.py). See docs/classification.md.

Momentum copies start from the loaded weights. ALBEF's NLVR.py copies the student into them before
loading the TA checkpoint, which holds no momentum weights, so its momentum ViT, cross-attention
and upper fusion layers start random (its text layers from BERT) and hold 0.995^k of that start
after k steps (still 8% after 500, under 1% after 1000): the distillation targets of the first
epoch come from a model that never saw an image. LAVIS copies after loading ("required when initializing the model from TA pre-trained
weights"), and so do we (albef_ds.checkpoint.loading.load_state copies absent momentum weights from the online
ones): distillation then starts from the student, as it does for every other task.
"""
from __future__ import annotations

from ..data.labelled import NLVR_LABELS
from ..models.bert import double_fusion_layers
from ..models.classifier import NLVRClassifier
from .snli_ve import DistilledClassifier, SNLIVETask, doubled_fusion


class NLVRModel(DistilledClassifier, NLVRClassifier):
    alpha_warmup = True


class NLVR2Task(SNLIVETask):
    name = "nlvr2"
    inference_class = NLVRClassifier
    training_class = NLVRModel
    labels = NLVR_LABELS

    @classmethod
    def is_release(cls, keys: set) -> bool:
        return "cls_head.0.weight" in keys and doubled_fusion(keys)

    def initial_state(self, state: dict, source_task: str) -> dict:
        """A text-assignment checkpoint as it is (its head and projections are dropped); a
        one-image checkpoint (pretraining, ...) with each fusion layer copied into its pair."""
        return double_fusion_layers(state, self.cfg.model.text)

    eval_command_help = "NLVR2 accuracy (is the sentence true of the image pair?) on ALBEF's nlvr_*.json"


TASK = NLVR2Task
