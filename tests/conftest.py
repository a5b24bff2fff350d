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


@pytest.fixture(autouse=True)
def _process_state_does_not_leak():
    """A test that starts a process group in the pytest process (benchmarks' dry runs do) leaves RANK,
    MASTER_PORT, ... in os.environ and its store listening; later `mpoe-train` subprocesses would inherit
    them and join that dead world. Every test gets the environment and the world it started with."""
    env = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
