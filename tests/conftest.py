from pathlib import Path

import pytest
import torch
from serve_helpers import make_photos, make_tiny_model
from train_helpers import TINY, write_demo_photos

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


# serve-batch fixtures, shared by tests/unit/test_serve.py and tests/e2e/test_serve_kill.py


@pytest.fixture(scope="module")
def one_compute_thread():
    """Tiny models gain nothing from a second thread, and the reader thread needs the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "vae")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos"))


# training fixtures, shared by tests/unit/test_train.py and the training runs in tests/e2e


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    """Six demo photos at 48 px."""
    return write_demo_photos(tmp_path / "data", count=6, size=48)
