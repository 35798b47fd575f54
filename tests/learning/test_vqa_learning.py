"""Proof of learning for VQA: from the tiny pretrained checkpoint that reads positions
(tests/data/tiny_pretrained_positions.safetensors), fine-tuning with the engine
(DeepSpeed ZeRO-2, one CPU process) on the generated corpus answers held-out questions from the
image: far above what the same recipe reaches with the images shuffled (the question-only prior).
Also: the training checkpoint, consolidated by the conversion tool, answers as the trainer did.
Numbers and command: docs/vqa.md."""
import os
import time
from concurrent.futures import ThreadPoolExecutor

from helpers import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = dict(train_images=400, heldout_images=60, vg_images=100)


def finetune_and_evaluate(rank, world, out_dir, corpus, train_file, vg_file, init, consolidate):
    from albef_ds import load_model
    from albef_ds.checkpoint.files import convert
    from albef_ds.config import load_config
    from albef_ds.engine import Trainer

    started = time.perf_counter()
    cfg = load_config("tiny_vqa", [
        f"data.corpora=[{{name: vqa, annotations: [{train_file}], image_root: {corpus['vqa_root']}}}, "
        f"{{name: vg, annotations: [{vg_file}], image_root: {corpus['vg_root']}}}]",
        f"vqa.answer_list={corpus['answer_list']}", f"eval.data=[{corpus['heldout']}]",
        f"eval.image_root={corpus['vqa_root']}", f"model.init_checkpoint={init}"])
    trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"), out_dir)
    code = trainer.train()
    trained = time.perf_counter()
    out = trainer.evaluate()
    out.update(exit_code=code, steps=trainer.state.step, train_s=trained - started, eval_s=time.perf_counter() - trained,
               skipped_in_training=sum(trainer.stream.stats().values()))
    trainer.close()
    if consolidate:             # the training folder as one file, evaluated by itself
        convert(out_dir, os.path.join(out_dir, "vqa.safetensors"), momentum=False)
        out["consolidated"] = trainer.evaluator(load_model(os.path.join(out_dir, "vqa.safetensors")))
    return out


def test_finetuned_model_answers_from_the_image(tmp_path, tiny_pretrained_positions):
    from albef_ds.synthetic.vqa import shuffle_images, write_vqa_corpus

    corpus = write_vqa_corpus(str(tmp_path / "corpus"), **CORPUS)
    shuffled = (shuffle_images(corpus["train"], str(tmp_path / "train_shuffled.json")),
                shuffle_images(corpus["vg"], str(tmp_path / "vg_shuffled.json")))
    # the two fine-tunings side by side, one process each
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_ranks, finetune_and_evaluate, 1, str(tmp_path / name), corpus, *files,
                            tiny_pretrained_positions, name == "real")
                for name, files in (("real", (corpus["train"], corpus["vg"])), ("shuffled", shuffled))]
        real, prior = (run.result()[0] for run in runs)
    for run in (real, prior):
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in run.items() if k != "consolidated"})
        assert run["exit_code"] == 0 and run["skipped_in_training"] == 0 and run["skipped"] == 0
    # The margins: at least 60% overall and at least twice the question-only prior (measured
    # 73.87 vs 35.93, docs/vqa.md) ...
    assert real["acc"] >= 60.0 and real["acc"] >= 2 * prior["acc"], (real["acc"], prior["acc"])
    # ... and they hold on what the checkpoint reads best from the image
    for kind in ("colour", "position"):
        accuracy, prior_accuracy = real["per_question_type"][kind], prior["per_question_type"][kind]
        assert accuracy >= 60.0 and accuracy >= 2 * prior_accuracy, (kind, accuracy, prior_accuracy)
    consolidated = real["consolidated"]
    assert {"acc", "per_question_type"} <= set(consolidated), consolidated     # no metric left out
    assert {k: v for k, v in consolidated.items() if k != "result_file"} == {
        k: v for k, v in real.items() if k in consolidated and k != "result_file"}
