import pytest
import torch

# The suite runs on 2 cores; one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _clean_zturbo_env(monkeypatch):
    """Tests never inherit ZTURBO_* settings from the caller's environment."""
    import os

    for key in list(os.environ):
        if key.startswith("ZTURBO_"):
            monkeypatch.delenv(key, raising=False)
