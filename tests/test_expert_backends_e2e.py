"""`mpoe-train` with moe.expert_impl=grouped logs the losses that moe.expert_impl=loop logs."""

import pytest
from _cli import metrics, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["switch", "mpoe"])
def test_grouped_backend_training_logs_the_losses_of_loop(tmp_path, mpoe_cache, kind):
    runs = {impl: tmp_path / impl for impl in ("loop", "grouped")}
    for impl, run in runs.items():
        train(run, mpoe_cache, f"moe={kind}", f"moe.expert_impl={impl}", "logging.wandb.mode=disabled")
    for impl, run in runs.items():  # chosen once, after DeepSpeed placed the model, and said once
        assert (run / "main.log").read_text().count(f"experts: {impl}, fp32, cpu\n") == 1
    loop, grouped = metrics(runs["loop"]), metrics(runs["grouped"])
    assert len(loop) == len(grouped) > 0
    assert [r["loss"] for r in grouped] == pytest.approx([r["loss"] for r in loop], rel=1e-5)
    assert [r["aux_loss"] for r in grouped] == pytest.approx([r["aux_loss"] for r in loop], rel=1e-5)


def test_recomputed_mpo_weights_log_the_same_losses(tmp_path, mpoe_cache):
    runs = {option: tmp_path / option for option in ("false", "true")}
    for option, run in runs.items():
        overrides = ("moe=mpoe", "moe.expert_impl=grouped", f"moe.recompute_mpo_weights={option}")
        train(run, mpoe_cache, *overrides, "logging.wandb.mode=disabled")
    kept, recomputed = metrics(runs["false"]), metrics(runs["true"])
    assert len(kept) == len(recomputed) > 0
    assert [r["loss"] for r in recomputed] == [r["loss"] for r in kept]  # the same ops on the same values
