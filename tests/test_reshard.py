"""A checkpoint saved at one expert-parallel layout resumes at another: experts re-partitioned,
optimizer state following them, outputs and the continued loss curve unchanged."""

import types
from pathlib import Path

import pytest
import torch
from _cli import metrics, summary, train
from test_low_precision_steps import _build, _cfg, _step

from mpoe.parallel.deepspeed.optimizer_state import adam_view
from mpoe.parallel.local_world import spawn_world
from mpoe.train.checkpoint import store as checkpoint
from mpoe.train.checkpoint.adam_state import portable_forms
from mpoe.train.checkpoint.reshard import RankFiles, join_ep_group, load_resharded

pytestmark = pytest.mark.slow

# The load-balance loss uses each rank's own tokens (see test_train_e2e), so it is off here:
# what is compared is the model and optimizer state crossing layouts.
COMMON = [
    "moe=mpoe",
    "moe.num_experts=4",
    "moe.aux_loss_coef=0",
    "trainer.max_steps=6",
    "trainer.save_every=2",
    "trainer.keep_last=5",
    "trainer.eval_every=6",
    "trainer.global_batch_size=8",
    "logging.wandb.mode=disabled",
]
ONE = ["trainer.micro_batch_size=8", "trainer.eval_sequences=32", "parallel.ep_size=1", "parallel.zero_stage=0"]
TWO = ["trainer.micro_batch_size=4", "trainer.eval_sequences=32", "parallel.ep_size=2"]


def _losses(run, steps):
    by_step = {r["step"]: r["loss"] for r in metrics(run)}
    return [by_step[s] for s in steps]


def test_ep1_checkpoint_continues_at_ep2_and_back(tmp_path, mpoe_cache):
    base, wide, back = tmp_path / "base", tmp_path / "wide", tmp_path / "back"
    train(base, mpoe_cache, *COMMON, *ONE)
    # 1 process, all experts local -> 2 processes, 2 experts each, ZeRO 1
    train(
        wide,
        mpoe_cache,
        *COMMON,
        *TWO,
        "parallel.zero_stage=1",
        f"trainer.resume={base / 'checkpoints' / 'step_00000004'}",
        nproc=2,
    )
    assert _losses(wide, [5, 6]) == pytest.approx(_losses(base, [5, 6]), rel=1e-5)
    assert summary(wide)["val_loss"] == pytest.approx(summary(base)["val_loss"], rel=1e-5)
    # and the 2-process ZeRO-1 checkpoint of step 6 evaluates identically on 1 process
    train(back, mpoe_cache, *COMMON, *ONE, f"trainer.resume={wide / 'checkpoints' / 'step_00000006'}")
    assert summary(back)["val_loss"] == pytest.approx(summary(wide)["val_loss"], rel=1e-5)


def test_resume_with_another_model_is_one_line(tmp_path, mpoe_cache):
    base = tmp_path / "base"
    train(base, mpoe_cache, *COMMON, *ONE, "trainer.max_steps=2")
    switch = [o for o in COMMON if not o.startswith("moe=")] + ["moe=switch"]
    proc = train(
        tmp_path / "other",
        mpoe_cache,
        *switch,
        *ONE,
        f"trainer.resume={base / 'checkpoints' / 'step_00000002'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "saved with moe='mpoe'" in proc.stderr.strip().splitlines()[-1]


def test_ep1_checkpoint_continues_on_four_processes_at_ep4_zero2(tmp_path, mpoe_cache):
    base, four = tmp_path / "base", tmp_path / "four"
    train(base, mpoe_cache, *COMMON, *ONE)
    train(
        four,
        mpoe_cache,
        *COMMON,
        "trainer.micro_batch_size=2",
        "trainer.eval_sequences=32",
        "parallel.ep_size=4",
        "parallel.zero_stage=2",
        f"trainer.resume={base / 'checkpoints' / 'step_00000004'}",
        nproc=4,
    )
    assert _losses(four, [5, 6]) == pytest.approx(_losses(base, [5, 6]), rel=1e-5)
    assert summary(four)["val_loss"] == pytest.approx(summary(base)["val_loss"], rel=1e-5)  # the same 32 sequences


def _portable(path):
    files = RankFiles(path)
    return files(0)["module"], portable_forms(files, 1)[0]


def _assert_same_training_state(a, b):
    """Module weights, and per parameter Adam's moments and float32 master weight, bit for bit."""
    (module_a, adam_a), (module_b, adam_b) = _portable(a), _portable(b)
    assert module_a.keys() == module_b.keys()
    for name, tensor in module_a.items():
        assert torch.equal(tensor, module_b[name]), name
    assert adam_a["step"] == adam_b["step"]
    assert adam_a["params"].keys() == adam_b["params"].keys() and adam_a["params"]
    for name, values in adam_a["params"].items():
        assert values.keys() == {"exp_avg", "exp_avg_sq", "master"}, name  # bf16: the master is not the weight
        for key, tensor in values.items():
            assert torch.equal(tensor, adam_b["params"][name][key]), f"{name}.{key}"


def test_bf16_training_state_crosses_zero_stages_exactly(tmp_path, mpoe_cache):
    """bf16 keeps float32 master weights beside the bf16 model: a checkpoint moved from ZeRO 1 to ZeRO 2 (another
    partitioning, so the portable form is what is loaded) and saved again without a step holds the same weights,
    masters and Adam moments, bit for bit."""
    bf16 = [*COMMON, "trainer.max_steps=2", "trainer.precision=bf16", "trainer.micro_batch_size=8"]
    bf16 += ["trainer.eval_sequences=8", "parallel.ep_size=1"]
    zero1, zero2 = tmp_path / "zero1", tmp_path / "zero2"
    step = "checkpoints/step_00000002"
    train(zero1, mpoe_cache, *bf16, "parallel.zero_stage=1")
    assert all(7 < r["loss"] < 9 for r in metrics(zero1))  # a bf16 mpoe-train run on the CPU trains: ~ln(4096) at init
    train(zero2, mpoe_cache, *bf16, "parallel.zero_stage=2", f"trainer.resume={zero1 / step}")
    _assert_same_training_state(zero1 / step, zero2 / step)


def test_a_checkpoint_without_optimizer_state_by_name_is_refused_not_resumed_with_fresh_adam(tmp_path):
    """Older bf16/fp16 ZeRO-0 checkpoints stored an empty portable form: resharding must not start Adam afresh."""
    torch.save({"portable_optimizer": {"step": 3, "params": {}}, "module": {}}, tmp_path / "rank_00000.pt")
    engine = types.SimpleNamespace(module=torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="holds no optimizer state by parameter name"):
        load_resharded(engine, tmp_path, {"ep_size": 1}, 0, 4, 4, 0)


def _checkpoint_form_is_the_live_state(rank: int, root: str) -> None:
    """On 4 ranks at ep_size 2 (expert parameters partitioned over expert-data-parallel pairs, shared ones over
    all 4): the Adam state derived from the checkpoint's ZeRO partitions equals what DeepSpeed's own per-parameter
    API (`safe_get_full_*`) reads from the live optimizer, for every parameter of the rank's first-replica twin."""
    for precision, zero in (("bf16", 1), ("fp32", 2)):  # DeepSpeed's BF16_Optimizer; its ZeRO optimizer
        tr = _build(_cfg(precision, zero, world=4, ep=2), world=4, rank=rank)
        for step in range(2):
            _step(tr, step)
        live = adam_view(tr.engine)  # collective reads: every rank takes part
        truth = {name: live.read(p) for name, p in tr.engine.module.named_parameters()}
        saved = checkpoint.save(tr.engine, Path(root) / precision, 2, {"ep_size": 2}, keep_last=1)
        form = portable_forms(RankFiles(saved), 2)[rank % 2]
        assert form["step"] == live.step() == 2
        assert form["params"].keys() == truth.keys()
        for name, values in truth.items():
            assert form["params"][name].keys() == values.keys(), name
            for key, tensor in values.items():
                assert torch.equal(form["params"][name][key], tensor.cpu()), f"{precision} {name}.{key}"


def test_zero_checkpoints_store_adam_once_and_derive_the_per_parameter_state_exactly(tmp_path):
    spawn_world(_checkpoint_form_is_the_live_state, 4, str(tmp_path))


def test_joining_an_expert_parallel_groups_values():
    """Experts concatenated in rank order, a shared value is rank 0's, none saved is None, part saved is an error."""
    a, b = torch.zeros(2, 3), torch.ones(1, 3)
    assert torch.equal(join_ep_group("w", [a, b], expert=True), torch.cat([a, b]))
    assert join_ep_group("w", [a, b], expert=False) is a
    assert join_ep_group("w", [None, None], expert=True) is None
    with pytest.raises(RuntimeError, match="w: saved by 1 of the 2 expert-parallel ranks"):
        join_ep_group("w", [a, None], expert=True)
