"""Checkpoints verify themselves: a tag's manifest lists every file with its size and CRC-32, and
whatever happens to a file afterwards (cut short, overwritten, removed, the manifest itself broken
or never written) is found and named; a resume takes the newest tag that passes."""
import json
import os
import zlib

import pytest

from albef_ds.checkpoint.elastic import choose_tag, tag_problems
from albef_ds.checkpoint.manifest import MANIFEST, verify, write_manifest
from albef_ds.checkpoint.training import RUN_FORMAT, RUN_INFO
from albef_ds.config import ConfigError

FILES = {"mp_rank_00_model_states.pt": 3000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 5000,
         "zero_pp_rank_1_mp_rank_00_optim_states.pt": 5000, "albef_rank0.pt": 700, "albef_rank1.pt": 700}


def saved_tag(ckpt_dir, step, manifest=True, run_format=RUN_FORMAT) -> str:
    """A tag folder as a 2-rank save leaves it (contents are stand-ins: the check reads bytes)."""
    tag = f"step{step:08d}"
    folder = os.path.join(ckpt_dir, tag)
    os.makedirs(folder)
    for name, size in FILES.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(bytes((step + i * 7 + len(name)) % 251 for i in range(size)))
    with open(os.path.join(folder, RUN_INFO), "w") as f:
        json.dump({"world_size": 2, "batch_size": 4, "grad_accum": 1, "config": {}, "format": run_format}, f)
    if manifest:
        write_manifest(folder)
    return tag


def test_the_manifest_lists_every_file_with_size_and_crc(tmp_path):
    folder = os.path.join(tmp_path, saved_tag(str(tmp_path), 4))
    listed = json.load(open(os.path.join(folder, MANIFEST)))["files"]
    assert sorted(listed) == sorted([*FILES, RUN_INFO])
    for name, entry in listed.items():
        data = open(os.path.join(folder, name), "rb").read()
        assert entry == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert verify(folder) == []


@pytest.mark.parametrize("damage", ["cut short", "same size, other bytes", "removed", "manifest broken",
                                    "manifest never written"])
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                  "albef_rank1.pt"])
def test_each_damage_to_each_file_kind_is_found_and_named(tmp_path, damage, name):
    ckpt_dir = str(tmp_path)
    older, newer = saved_tag(ckpt_dir, 2), saved_tag(ckpt_dir, 4)
    folder = os.path.join(ckpt_dir, newer)
    path = os.path.join(folder, name)
    if damage == "cut short":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "same size, other bytes":
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"\0" * 50)
    elif damage == "removed":
        os.remove(path)
    elif damage == "manifest broken":
        with open(os.path.join(folder, MANIFEST), "w") as f:
            f.write('{"files": {')
    else:
        os.remove(os.path.join(folder, MANIFEST))
    problems = tag_problems(ckpt_dir, newer)
    named = MANIFEST if damage.startswith("manifest") else name
    assert problems and named in problems[0], problems
    tag, damaged = choose_tag(ckpt_dir, newer)
    assert tag == older and list(damaged) == [newer]


def test_a_tag_saved_before_manifests_is_checked_for_completeness_only(tmp_path):
    ckpt_dir = str(tmp_path)
    tag = saved_tag(ckpt_dir, 3, manifest=False, run_format=1)
    assert tag_problems(ckpt_dir, tag) == []
    os.remove(os.path.join(ckpt_dir, tag, "albef_rank1.pt"))
    assert "albef_rank1.pt: missing" in tag_problems(ckpt_dir, tag)[0]


def test_no_tag_passing_is_one_error_naming_the_files(tmp_path):
    ckpt_dir = str(tmp_path)
    for step in (2, 4):
        tag = saved_tag(ckpt_dir, step)
        os.truncate(os.path.join(ckpt_dir, tag, "albef_rank0.pt"), 10)
    with pytest.raises(ConfigError, match=r"no checkpoint in .* passes its check: step00000004: .*albef_rank0.pt.*"
                                          r"step00000002: .*albef_rank0.pt"):
        choose_tag(ckpt_dir, "step00000004")
