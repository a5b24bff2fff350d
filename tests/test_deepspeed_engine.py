"""The DeepSpeed engine mpoe builds (`mpoe.parallel.deepspeed.engine`): nothing in it synchronizes the device per
micro-step, and its LR schedule starts at the first update without DeepSpeed warning that it has not started."""

import dataclasses
import logging

import pytest
from _cli import train
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger as deepspeed_logger
from test_low_precision_steps import _build, _cfg, _step

from mpoe.parallel.deepspeed.engine import deepspeed_config

NOT_STARTED = "before it has started"  # DeepSpeed's warning when its schedule is asked for an LR at iteration -1


@pytest.fixture
def device_syncs(monkeypatch):
    """The calls to DeepSpeed's accelerator `synchronize` (a host wait for all queued device work) made so far."""
    accelerator = type(get_accelerator())
    calls = []
    real = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


@pytest.fixture
def deepspeed_log():
    """The messages DeepSpeed's own logger emits (it does not propagate to the root logger)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    deepspeed_logger.addHandler(handler)
    yield messages
    deepspeed_logger.removeHandler(handler)


def test_deepspeeds_throughput_timer_is_off_so_steps_never_wait_for_the_device(device_syncs):
    """The throughput timer, on by default, synchronizes the device at the start and end of every micro-step once
    two steps are done; it is off in the config mpoe builds, and four steps of two micro-batches wait for nothing."""
    cfg = _cfg("fp32", accum=2)
    assert deepspeed_config(cfg, 1)["timers"] == {"throughput": {"enabled": False}}
    tr = _build(cfg)
    assert tr.engine.tput_timer.config.enabled is False
    for step in range(4):
        _step(tr, step)
    assert device_syncs == []


def test_the_schedule_starts_at_the_first_update_without_deepspeeds_warning(deepspeed_log):
    """Linear warmup over 4 steps: the updates run at lr x 0, 1/4, 2/4, 3/4 (the first update has lr 0, as HF's and
    Megatron's warmups start), and building the engine asks the schedule for no LR before its start."""
    cfg = _cfg("fp32")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=4))
    tr = _build(cfg)
    assert not [m for m in deepspeed_log if NOT_STARTED in m]
    used = []
    for step in range(4):
        used.append(tr.engine.get_lr()[0])
        _step(tr, step)
    assert used == pytest.approx([cfg.optim.lr * k / 4 for k in range(4)], rel=1e-12)


@pytest.mark.slow
def test_a_run_prints_no_warning_about_the_lr_schedule(tmp_path, mpoe_cache):
    proc = train(tmp_path / "run", mpoe_cache, "trainer.max_steps=2", "trainer.eval_every=2")
    assert "trained to step 2" in proc.stdout  # the run's output is what was captured
    assert NOT_STARTED not in proc.stdout + proc.stderr
