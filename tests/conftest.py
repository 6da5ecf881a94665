import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Compiled kernels go to a fresh folder per run: every run exercises the build, and nothing leaks into ~/.cache.
os.environ["LEARNEDOPT_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="learnedopt-kernels-")
atexit.register(shutil.rmtree, os.environ["LEARNEDOPT_KERNEL_CACHE"], ignore_errors=True)

# The suite's tensors are small: one thread avoids OpenMP overhead and oversubscription on 2-core CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def small_net():
    """An untrained LSTM net with weights large enough that its updates are not negligible."""
    from learnedopt import CoordinatewiseLSTM

    torch.manual_seed(1)
    return CoordinatewiseLSTM()
