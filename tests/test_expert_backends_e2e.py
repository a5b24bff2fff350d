"""`mpoe-train` with moe.expert_impl=grouped logs the losses that moe.expert_impl=loop logs."""

import pytest
from _cli import metrics, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_grouped_backend_training_logs_the_losses_of_loop(tmp_path, mpoe_cache, kind):
    runs = {impl: tmp_path / impl for impl in ("loop", "grouped")}
    for impl, run in runs.items():
        train(run, mpoe_cache, f"moe={kind}", f"moe.expert_impl={impl}", "logging.wandb.mode=disabled")
    loop, grouped = metrics(runs["loop"]), metrics(runs["grouped"])
    assert len(loop) == len(grouped) > 0
    assert [r["loss"] for r in grouped] == pytest.approx([r["loss"] for r in loop], rel=1e-5)
    assert [r["aux_loss"] for r in grouped] == pytest.approx([r["aux_loss"] for r in loop], rel=1e-5)
