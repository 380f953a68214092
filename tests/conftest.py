import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter (must be set before they are defined)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; still part of the suite")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_seed():
    """A new seed every run (printed so a failure can be replayed with RABITQ_TEST_SEED)."""
    seed = int(os.environ.get("RABITQ_TEST_SEED", torch.seed() % 2**31))
    print(f"RABITQ_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return seed
