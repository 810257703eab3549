import random

import numpy as np
import pytest
import torch

# Two cores are shared by everything on the machine: one intra-op thread keeps the
# suite's timing predictable and avoids oversubscription when tests spawn processes.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (seeds the legacy global RNG that libraries still use)
    torch.manual_seed(0)
    yield
