"""Shared fixtures. Tests run on CPU with a fixed thread count so results are bitwise repeatable."""
import os

import pytest

pytest_plugins = ["pytester"]
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the network in tests (load_sd15 test overrides)
torch.set_num_threads(int(os.environ.get("SPDBENCH_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_random():
    import spdbench

    return spdbench.load_target("tiny-random")


@pytest.fixture(scope="session")
def photos64():
    import spdbench

    return spdbench.load_photos(n=4, size=64)
