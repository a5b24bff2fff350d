"""Shared test setup: CPU DeepSpeed, no W&B network, and one data cache per test session."""

import os

import pytest
import torch  # noqa: E402

if not torch.cuda.is_available():  # on a GPU machine DeepSpeed must find CUDA (the `gpu` tests)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def mpoe_cache(tmp_path_factory):
    """A data/tokenizer cache shared by every end-to-end run of the session (built once)."""
    path = os.environ.get("MPOE_TEST_CACHE") or str(tmp_path_factory.mktemp("mpoe-cache"))
    os.environ["MPOE_CACHE"] = path
    return path
