"""tools/doc_proofs.py, which the learning tests run the docs' proofs with: a doc's command block
read as bash would run it, output/ moved and seeds added only where they belong, the doc's tables
read, a number that moved found; and every doc with a reader holds a command block and a table."""
import os

from helpers import tool

DOC = """# A doc

<!-- proof: commands -->
```bash
python -m albef_ds.synthetic.grounding --out_dir output/data     # prints the overrides
# a comment line
python albef_ds/train.py --deepspeed ds_configs/zero2.json --config tiny_grounding --output_dir output/run \\
    'data.corpora=[{name: g, annotations: [output/data/train.json], image_root: output/data}]' \\
    model.init_checkpoint=tests/data/tiny_pretrained_positions.safetensors
python -m albef_ds.evaluate grounding --checkpoint output/run --output_dir output/eval
```

<!-- proof: numbers -->
| run | dev | test |
| --- | --- | --- |
| trained | 81.30 | 78.0% |
| shuffled | 45.7 | n/a |

text

<!-- proof: numbers -->
| pre-step | loss |
| --- | --- |
| last steps | 0.43 |
"""


def test_the_block_is_read_as_bash_runs_it_and_moved_to_the_output_folder(tmp_path):
    proofs = tool("doc_proofs")
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    commands = proofs.commands(str(doc))
    assert len(commands) == 3
    assert commands[0] == "python -m albef_ds.synthetic.grounding --out_dir output/data"
    assert commands[1].startswith("python albef_ds/train.py") and commands[1].endswith(
        "model.init_checkpoint=tests/data/tiny_pretrained_positions.safetensors")
    moved = [proofs.as_run(c, "/tmp/x", 7) for c in commands]
    assert moved[0] == "python -m albef_ds.synthetic.grounding --out_dir /tmp/x/data"
    assert "annotations: [/tmp/x/data/train.json], image_root: /tmp/x/data}" in moved[1]
    assert "tests/data/tiny_pretrained_positions.safetensors" in moved[1]          # not an output folder
    assert moved[1].endswith(" train.seed=7") and "train.seed" not in moved[0] + moved[2]
    assert proofs.as_run(commands[1], "/tmp/x", proofs.DEFAULT_SEED) == commands[1].replace("output/", "/tmp/x/")


def test_the_tables_are_read_and_a_number_that_moved_is_found(tmp_path):
    proofs = tool("doc_proofs")
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    written = proofs.table(str(doc))
    assert written == {"trained": {"dev": 81.3, "test": 78.0}, "shuffled": {"dev": 45.7},
                       "last steps": {"loss": 0.43}}
    got = {"trained": {"dev": 81.31, "test": 78.0}, "shuffled": {"dev": 45.7}, "last steps": {"loss": 0.43}}
    assert proofs.differences(got, written, {}, 0.05) == []
    got["trained"]["test"] = 72.0
    got["last steps"]["steps"] = 256
    assert proofs.differences(got, written, {("trained", "test"): 5.0}, 0.05) == [
        "trained / test: the doc says 78.0, the run gave 72.00 (allowed: 5.00 either way)",
        "last steps / steps: 256.00 measured, not in the doc's table"]
    assert proofs.differences({"trained": {"test": 72.0}}, written, {("trained", "test"): 6.0}, 0.05) == []


def test_every_doc_with_a_reader_holds_its_commands_and_a_table():
    proofs = tool("doc_proofs")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in proofs.READERS:
        doc = os.path.join(root, "docs", name)
        assert proofs.commands(doc), name
        assert proofs.table(doc), name
