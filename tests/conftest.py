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


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu / tensorrt skip, with the reason, where that hardware or package is absent."""
    import importlib.util

    has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if ("gpu" in item.keywords or "tensorrt" in item.keywords) and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)"))
        elif "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (pip install 'zturbo[gpu]')"))
