"""The random number generators' state (torch, numpy, Python, and CUDA's where present), saved with a
checkpoint for an exact resume."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # router jitter and dropout draw from the GPU's generator there
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # a CPU checkpoint resumed on a GPU keeps the GPU's seed
        torch.cuda.set_rng_state(state["cuda"])
