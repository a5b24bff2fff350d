"""Models assembled from configs: tiny GPT-2/T5 of each kind learn.

Parameter counts equal published and hand-computed ones."""

import math
from dataclasses import replace

import pytest
import torch

from mpoe.config import ModelConfig, MoEConfig, TrainConfig, TrainerConfig
from mpoe.models.accounting import count_params, mpoe_vs_switch_ratio
from mpoe.models.build import build_model, moe_layers
from mpoe.parallel.expert_placement import ExpertPlacement

VOCAB = 96


def tiny_cfg(family: str = "gpt2", kind: str = "dense", **moe) -> TrainConfig:
    """A model that builds and steps in well under a second."""
    if family == "gpt2":
        model = ModelConfig(
            family="gpt2",
            name="test_gpt2",
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=32,
        )
    else:
        model = ModelConfig(
            family="t5",
            name="test_t5",
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            d_kv=16,
            vocab_size=VOCAB,
            activation="relu",
        )
    moe_cfg = MoEConfig(kind=kind, **{"num_experts": 4, **moe})
    return TrainConfig(model=model, moe=moe_cfg, trainer=TrainerConfig(seed=0, seq_len=16))


def tiny_batch(family: str, cfg: TrainConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "gpt2":
        return {"input_ids": torch.randint(2, VOCAB, (4, 16), generator=g)}
    from mpoe.models.t5 import sentinel_ids
    from mpoe.train.data.span_corruption import SpanCorruption

    sc = SpanCorruption.for_inputs_length(16, sentinel_ids(VOCAB), eos_id=0)
    return sc.batch(torch.randint(2, VOCAB, (4, sc.raw_length), generator=g))


def embedding_of(model) -> int:
    from mpoe.models import family

    return family.get(model.family).embedding_params(model.backbone)


@pytest.mark.parametrize("kind", ["dense", "switch", "mpoe"])
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_loss_falls_on_a_fixed_batch(family, kind):
    cfg = tiny_cfg(family, kind)
    model = build_model(cfg, VOCAB, eot_id=0, pad_id=1, placement=ExpertPlacement())
    assert len(moe_layers(model)) == (0 if kind == "dense" else (1 if family == "gpt2" else 2))
    batch = tiny_batch(family, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    if kind != "dense":
        assert out.aux_loss > 0 and len(out.tokens_per_expert) == len(moe_layers(model))


def _meta_count(cfg: TrainConfig, vocab: int) -> dict:
    """The dry-run path: shapes only (meta device, no SVDs)."""
    cfg = replace(cfg, trainer=replace(cfg.trainer, dry_run=True))  # a validated config is read-only
    model = build_model(cfg, vocab, 0, 1, ExpertPlacement())
    return count_params(model, embedding_of(model), cfg.moe.top_k, 1)


def _from_yaml(name: str, *overrides: str) -> TrainConfig:
    from mpoe.train.compose import compose_and_validate

    return compose_and_validate([f"model={name}", "moe=dense", *overrides], 1)


# Released totals (Hugging Face model cards / num_parameters()): embeddings included, tied LM head once.
GPT2_RELEASED = {"gpt2_small": (124_439_808, 768), "gpt2_medium": (354_823_168, 1024)}
T5_RELEASED = {"t5_small": 60_506_624, "t5_base": 222_903_552, "t5_large": 737_668_096}


@pytest.mark.parametrize("name", list(GPT2_RELEASED))
def test_gpt2_shapes_match_released_counts(name):
    total, d_model = GPT2_RELEASED[name]
    counts = _meta_count(_from_yaml(name), 50257)
    embedding = 50257 * d_model + 1024 * d_model
    assert counts["params_embedding"] == embedding and counts["params_lm_head"] == 0
    assert counts["params_total"] - counts["params_embedding"] == total - embedding


def _hf_t5_published(d_model, d_ff, layers, heads):
    """T5 v1.0 released config (relu, d_kv 64, vocab 32128, tied), built by transformers itself on meta."""
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        m = T5ForConditionalGeneration(
            T5Config(
                vocab_size=32128,
                d_model=d_model,
                d_kv=64,
                d_ff=d_ff,
                num_layers=layers,
                num_heads=heads,
                feed_forward_proj="relu",
            )
        )
    return m.num_parameters()


@pytest.mark.parametrize(
    "name,shape",
    [("t5_small", (512, 2048, 6, 8)), ("t5_base", (768, 3072, 12, 12)), ("t5_large", (1024, 4096, 24, 16))],
)
def test_t5_shapes_match_released_counts(name, shape):
    released = _hf_t5_published(*shape)
    assert released == T5_RELEASED[name]
    counts = _meta_count(_from_yaml(name), 32000)  # the SentencePiece vocabulary; +100 sentinels -> 32128 rows
    assert counts["params_embedding"] == 32128 * shape[0]
    assert counts["params_total"] - counts["params_embedding"] == released - 32128 * shape[0]


def _ffn(d_model, d_ff, bias):
    return 2 * d_model * d_ff + ((d_model + d_ff) if bias else 0)


def _mpo_by_hand(in_f, out_f):
    """Full-bond MPO tensor sizes: d_k = min(prod of left i*j, prod of right i*j)."""
    sizes = [i * j for i, j in zip(in_f, out_f)]
    d = [1] + [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))] + [1]
    return [d[k] * sizes[k] * d[k + 1] for k in range(len(sizes))]


def test_gpt2_tiny_counts_by_hand():
    """gpt2_tiny: 4 layers, d 128, ff 512, vocab 4096, 256 positions; MoE in layers 1 and 3, 4 experts."""
    d, ff, layers, E = 128, 512, 4, 4
    per_layer_non_ffn = 4 * d + (3 * d * d + 3 * d) + (d * d + d)  # 2 layer norms, qkv, proj
    embedding = 4096 * d + 256 * d
    dense_total = embedding + layers * (per_layer_non_ffn + _ffn(d, ff, True)) + 2 * d  # + final norm
    cfg = _from_yaml("gpt2_tiny")
    assert _meta_count(cfg, 4096)["params_total"] == dense_total

    cfg = replace(cfg, moe=MoEConfig(kind="switch", num_experts=E, top_k=1))
    switch = _meta_count(cfg, 4096)
    assert switch["params_total"] == dense_total + 2 * ((E - 1) * _ffn(d, ff, True) + d * E)
    assert switch["params_router"] == 2 * d * E and switch["params_expert"] == 2 * E * _ffn(d, ff, True)
    assert switch["params_active"] == dense_total + 2 * d * E

    # 128 = 2*2*4*4*2 and 512 = 2*4*4*4*4 (mpo.factorize); W_in is 128x512, W_out 512x128
    cfg = replace(cfg, moe=MoEConfig(kind="mpoe", num_experts=E, top_k=1))
    mpoe = _meta_count(cfg, 4096)
    sizes_in, sizes_out = _mpo_by_hand([2, 2, 4, 4, 2], [2, 4, 4, 4, 4]), _mpo_by_hand([2, 4, 4, 4, 4], [2, 2, 4, 4, 2])
    central = sizes_in[2] + sizes_out[2]
    aux = sum(sizes_in) + sum(sizes_out) - central
    assert mpoe["params_central"] == 2 * central
    assert mpoe["params_auxiliary"] == 2 * E * aux
    per_moe_layer = central + E * (aux + ff + d) + d * E
    assert mpoe["params_total"] == dense_total - 2 * _ffn(d, ff, True) + 2 * per_moe_layer
    assert mpoe["params_active"] == dense_total - 2 * _ffn(d, ff, True) + 2 * (central + aux + ff + d + d * E)
    assert mpoe["params_switch_equivalent"] == switch["params_total"]
    # what a token's matmuls use: the experts' rebuilt dense W, as a Switch expert's (FLOPs follow this count)
    assert mpoe["params_active_compute"] == switch["params_active_compute"] == switch["params_active"]
    assert mpoe["switch_over_mpoe_params"] == round(switch["params_total"] / mpoe["params_total"], 3)
    assert mpoe["switch_over_mpoe_params"] > 1  # Switch is the larger one: the name says which way it divides
    assert "mpoe_vs_switch_total_ratio" not in mpoe  # the old name, whose direction read backwards, is gone
    ratio = mpoe_vs_switch_ratio(d, ff, 2, E, dense_total - 2 * _ffn(d, ff, True), bias=True)
    assert (ratio["switch_total"], ratio["mpoe_total"]) == (switch["params_total"], mpoe["params_total"])


def test_t5_moe_counts_by_hand():
    """T5 MoE layers sit in encoder and decoder blocks 1, 3, ...; T5 experts have no biases."""
    cfg = _from_yaml("t5_small")
    dense = _meta_count(cfg, 32000)["params_total"]
    cfg = replace(cfg, moe=MoEConfig(kind="switch", num_experts=8))
    switch = _meta_count(cfg, 32000)
    n_moe = 2 * 3
    assert switch["params_total"] == dense + n_moe * (7 * _ffn(512, 2048, False) + 512 * 8)
    # 512 = 2*4*4*4*4, 2048 = 4*4*8*4*4 (the paper's); bond cap 64
    cfg = replace(cfg, moe=MoEConfig(kind="mpoe", num_experts=8, bond_dim=64))
    mpoe = _meta_count(cfg, 32000)
    r = mpoe_vs_switch_ratio(512, 2048, n_moe, 8, dense - n_moe * _ffn(512, 2048, False), bond_dim=64)
    assert mpoe["params_total"] == r["mpoe_total"] and switch["params_total"] == r["switch_total"]


@pytest.mark.slow
def test_cli_dry_run_t5_base_mpoe(tmp_path, mpoe_cache):
    """The issue's command: builds on CPU in seconds (meta backbone, no SVDs), writes the counts."""
    import _cli

    _cli.train(tmp_path / "run", mpoe_cache, "model=t5_base", "moe=mpoe", "moe.num_experts=16", "trainer.dry_run=true")
    s = _cli.summary(tmp_path / "run")
    r = mpoe_vs_switch_ratio(768, 3072, 12, 16, T5_RELEASED["t5_base"] - 12 * _ffn(768, 3072, False))
    assert s["dry_run"] and s["params_total"] == r["mpoe_total"]
    assert s["params_switch_equivalent"] == r["switch_total"]
    assert s["params_embedding"] == 32128 * 768 and s["params_lm_head"] == 0


@pytest.mark.parametrize("family, activation", [("gpt2", "gelu_new"), ("t5", "gated-gelu")])
def test_dense_ffns_run_tanh_gelu_as_one_kernel_with_hf_gelu_new_outputs(family, activation):
    """HF's own model (its gelu_new written as elementwise ops) with the same weights is the reference."""
    from transformers.activations import NewGELUActivation

    from mpoe.models import family as families

    cfg = ModelConfig(
        name=f"{family}_tiny", family=family, d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=256,
        max_position_embeddings=32, activation=activation, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = families.get(family).build(cfg, 256, 0, 0).eval()
    hf = type(ours)(ours.config).eval()
    hf.load_state_dict(ours.state_dict())
    assert not any(isinstance(m, NewGELUActivation) for m in ours.modules())
    assert any(isinstance(m, NewGELUActivation) for m in hf.modules())  # the reference runs HF's own
    assert ours.config.to_dict() == hf.config.to_dict()  # what an export writes is unchanged
    ids = torch.randint(1, 250, (2, 16))
    kwargs = {"input_ids": ids} if family == "gpt2" else {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        torch.testing.assert_close(ours(**kwargs).logits, hf(**kwargs).logits, rtol=1e-5, atol=1e-5)
