"""A training run with evaluation writes the task's pictures of its first evaluation items to
TensorBoard at every evaluation: TensorBoard's own reader lists them, under the same tags each
time, as PNGs of the pictures' layout."""
import io
import os

from helpers import ds_config, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pretrain_with_evaluation_fn(rank, world, out_dir, checkpoint):
    from albef_ds.config import load_config
    from albef_ds.engine import Trainer
    from albef_ds.synthetic.shapes import with_generated_corpus

    cfg = load_config("tiny", [
        f"model.init_checkpoint={checkpoint}", "model.queue_size=64", "train.batch_size=8",
        "data.synthetic.train_samples=32", "data.synthetic.heldout_samples=8", "data.synthetic.samples_per_shard=32",
        "data.epoch_samples=16", "data.workers=0", "train.epochs=2", "train.max_steps=0", "train.save_every=1000",
        "train.log_every=1", "eval.every_epochs=1", "eval.k_test=4", "eval.pictures=3"])
    trainer = Trainer(with_generated_corpus(cfg, out_dir), ds_config(2), out_dir)
    assert trainer.train() == 0
    trainer.close()
    return trainer.evaluator.data.captions[:3]


def test_every_evaluation_writes_the_same_pictures_to_tensorboard(tmp_path, tiny_pretrained_positions, capfd):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    from albef_ds.pictures import PANEL, grid_size

    captions = run_ranks(pretrain_with_evaluation_fn, 1, str(tmp_path), tiny_pretrained_positions)[0]
    out = capfd.readouterr().out
    costs = [line for line in out.splitlines() if line.startswith("eval pictures at step")]
    print("\n".join(costs))
    assert [c.split(":")[0] for c in costs] == ["eval pictures at step 2", "eval pictures at step 4"]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert sorted(tags) == ["pictures/caption_0", "pictures/caption_1", "pictures/caption_2"]
    for i, tag in enumerate(tags):
        images = events.Images(tag)
        assert [e.step for e in images] == [2, 4]                         # after each epoch's evaluation
        words = len(captions[i][0].split())
        for event in images:
            picture = Image.open(io.BytesIO(event.encoded_image_string))
            assert picture.format == "PNG" and (event.width, event.height) == picture.size
            assert picture.size == grid_size((PANEL, PANEL), 2 + words)  # image, sentence, a panel per word
    # the scalars of the evaluation sit beside them
    assert [s.step for s in events.Scalars("eval/r_mean")] == [2, 4]
