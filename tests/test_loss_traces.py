"""The training math survives refactors: each case's 20 logged losses equal the trace recorded before issue 30's
redesign (tests/data/loss_traces.json, `python tests/loss_traces.py record`), to 1e-6 relative (a few float32
roundings: a newer transformers or DeepSpeed moves a loss of 9 by 2e-6 with our code unchanged; a change of the
math moves it by orders of magnitude more)."""

import json

import pytest
from loss_traces import CASES, TRACE_FILE, run_case


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_equal_the_recorded_trace(name, tmp_path, mpoe_cache):
    recorded = json.loads(TRACE_FILE.read_text())[name]
    losses = run_case(name, tmp_path, mpoe_cache)
    assert len(losses) == len(recorded)
    assert losses == pytest.approx(recorded, rel=1e-6, abs=1e-6)
