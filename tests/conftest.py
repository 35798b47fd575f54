import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_engine: runs albef_ds/train.py end to end")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
