import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The environment's own tools first (deepspeed, mpirun, and ninja: DeepSpeed's JIT ops rebuild
# whenever a different ninja binary looks at their build folder).
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _environment():
    """A command run in-process (train, evaluate) sets RANK, WORLD_SIZE, MASTER_PORT...: they must
    not reach the next test's launchers and jobs."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_pretrained():
    """The tiny ALBEF pretrained on the shapes corpus, shipped as a file (online weights, fp32; made
    by `make tiny-pretrained`): where the downstream tasks' learning tests start."""
    return os.path.join(os.path.dirname(__file__), "data", "tiny_pretrained.safetensors")


@pytest.fixture(scope="session")
def tiny_pretrained_positions():
    """The tiny ALBEF pretrained to read positions too (`make tiny-pretrained-positions`: sin-cos
    position start, batches of 32): where VQA's learning test starts."""
    return os.path.join(os.path.dirname(__file__), "data", "tiny_pretrained_positions.safetensors")


@pytest.fixture(scope="session")
def grounding_corpus(tmp_path_factory):
    """A small generated grounding corpus in ALBEF's RefCOCO+ file formats."""
    from albef_ds.synthetic.grounding import write_grounding_corpus

    return write_grounding_corpus(str(tmp_path_factory.mktemp("grounding")), train_images=12, val_images=4,
                                  test_images=6, image_size=96, seed=3)
