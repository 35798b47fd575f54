"""Retrieval fine-tuning: the pretraining engine and loop with the retrieval task.

    deepspeed albef_ds/finetune_retrieval.py --deepspeed ds_configs/zero2.json \\
        --config albef_ds/configs/retrieval_coco.yaml [--output_dir DIR] [key=value ...]

ITC with positives by image id through the index queue, ITM hard negatives that never pick a
caption of the same image, no MLM; evaluation on the validation set after every epoch and the
checkpoint with the best val r_mean kept as `best`. Same arguments as train.py.
"""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from albef_ds.train import main

if __name__ == "__main__":
    sys.exit(main(task="retrieval"))
