"""Upcycling a pre-trained (local) checkpoint: at step 0 Switch and full-bond MPOE models compute the dense model.

With top-2 normalised, dropless routing every token's output is w1*f(x) + w2*f(x) = f(x)
whatever the (random) router says, because every expert starts as the dense FFN f.
"""

import pytest
import torch
from test_models import VOCAB, tiny_batch, tiny_cfg
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from mpoe.config import ConfigError
from mpoe.models.build import build_model, moe_layers
from mpoe.parallel.expert_placement import ExpertPlacement


def _save_gpt2(path, vocab=VOCAB, positions=32):
    torch.manual_seed(7)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab, n_positions=positions, n_embd=32, n_inner=64, n_layer=2, n_head=2, initializer_range=0.2
        )
    )  # large weights: the FFNs matter
    hf.save_pretrained(path)
    return path


def _save_t5(path, gated=False):
    torch.manual_seed(7)
    hf = T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB + 128,
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu" if gated else "relu",
            initializer_factor=3.0,
            pad_token_id=1,
            decoder_start_token_id=1,
        )
    )
    hf.save_pretrained(path)
    return path


def _logits(family, path, kind, **moe):
    cfg = tiny_cfg(family, kind, **moe)
    cfg.model.pretrained = str(path)
    model = build_model(cfg, VOCAB, 0, 1, ExpertPlacement()).eval()
    with torch.no_grad():
        out = model(**tiny_batch(family, cfg), return_logits=True)
    return model, out


@pytest.mark.parametrize(
    "kind,moe", [("switch", {}), ("mpoe", {}), ("switch", {"num_experts": 8}), ("mpoe", {"num_experts": 8})]
)
@pytest.mark.parametrize("family", ["gpt2", "t5", "t5-gated"])
def test_upcycled_model_computes_the_dense_checkpoint(tmp_path, family, kind, moe):
    path = (
        _save_gpt2(tmp_path / "ckpt") if family == "gpt2" else _save_t5(tmp_path / "ckpt", gated=family == "t5-gated")
    )
    family = family[:4].rstrip("-")
    _, dense = _logits(family, path, "dense")
    model, up = _logits(family, path, kind, top_k=2, **moe)
    assert len(moe_layers(model)) > 0
    # Switch copies the weights (exact up to summation order); MPOE reconstructs them from float32 SVD factors
    tol = 1e-5 if kind == "switch" else 1e-4
    scale = dense.logits.abs().max().item()
    torch.testing.assert_close(up.logits, dense.logits, rtol=0, atol=tol * scale)
    assert abs(up.lm_loss.item() - dense.lm_loss.item()) < tol * max(1.0, dense.lm_loss.item())
    counts = [int(c.sum()) for c in up.tokens_per_expert]
    assert all(c > 0 for c in counts)  # tokens were really routed (2 per token)


def test_top1_upcycled_switch_scales_by_the_gate():
    """A reminder of why the check uses top-2: top-1 with softmax-before-top-k gates f(x) by p < 1."""
    cfg = tiny_cfg("gpt2", "switch", top_k=1, pre_softmax=True)
    assert not cfg.moe.topk_normalized()


def test_pretrained_shape_comes_from_the_checkpoint(tmp_path):
    path = _save_gpt2(tmp_path / "ckpt", positions=48)
    model, _ = _logits("gpt2", path, "dense")
    assert model.backbone.config.n_positions == 48 and model.backbone.config.n_embd == 32


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_a_half_precision_checkpoint_builds_a_float32_model(tmp_path, family):
    """DeepSpeed keeps float32 masters only of a float32 model: a bf16 file (a GPU run's export) must not make
    an fp32 run train bf16 weights."""
    path = _save_gpt2(tmp_path / "ckpt") if family == "gpt2" else _save_t5(tmp_path / "ckpt")
    saved = (GPT2LMHeadModel if family == "gpt2" else T5ForConditionalGeneration).from_pretrained(path)
    saved.to(torch.bfloat16).save_pretrained(path)
    model, out = _logits(family, path, "mpoe")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert out.logits.dtype == torch.float32


def test_wrong_checkpoint_is_a_one_line_config_error(tmp_path):
    cfg = tiny_cfg("t5", "dense")
    cfg.model.pretrained = str(_save_gpt2(tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match="model.family='t5'"):
        build_model(cfg, VOCAB, 0, 1, ExpertPlacement())
    cfg.model.pretrained = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="model.pretrained="):
        build_model(cfg, VOCAB, 0, 1, ExpertPlacement())
    cfg = tiny_cfg("gpt2", "dense")
    cfg.model.pretrained = str(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="token embeddings"):
        build_model(cfg, VOCAB + 10, 0, 1, ExpertPlacement())


def test_checkpoint_tokenizer_files_are_used(tmp_path):
    """data.tokenizer=<checkpoint dir>: tokenizer.json, or GPT-2's vocab.json + merges.txt; GPT-2 has no pad."""
    from mpoe.config import DataConfig
    from mpoe.train.data import corpus
    from mpoe.train.data import sequences as data

    tok = data.train_tokenizer(corpus.pydoc_topics()[:40], 400)
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    tok.save_model(str(gpt2_dir))  # vocab.json + merges.txt
    loaded = data.get_tokenizer(DataConfig(tokenizer=str(gpt2_dir)))
    text = "The assert statement"
    assert loaded.encode(text).ids == tok.encode(text).ids
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    tok.save(str(json_dir / "tokenizer.json"))
    assert data.special_ids(data.get_tokenizer(DataConfig(tokenizer=str(json_dir)))) == (0, 1)
    assert data.checkpoint_tokenizer_dir(str(json_dir)) == str(json_dir)
    assert data.checkpoint_tokenizer_dir(str(gpt2_dir)) == str(gpt2_dir)
    assert data.checkpoint_tokenizer_dir(str(tmp_path)) is None and data.checkpoint_tokenizer_dir(None) is None

    from tokenizers import Tokenizer, models

    t5_like = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    assert data.special_ids(t5_like) == (1, 0)
    gpt2_like = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
    assert data.special_ids(gpt2_like) == (1, 1)


@pytest.mark.slow
def test_cli_evaluates_upcycled_checkpoints_at_the_dense_val_loss(tmp_path, mpoe_cache):
    """The issue's check: trainer.max_steps=0 on a saved GPT-2, dense vs upcycled Switch and full-bond MPOE."""
    import _cli

    ckpt = _save_gpt2(tmp_path / "ckpt", vocab=4096, positions=256)  # the embedded BPE's 4096 ids
    losses = {}
    for kind in ("dense", "switch", "mpoe"):
        run = tmp_path / kind
        _cli.train(
            run,
            mpoe_cache,
            "model=gpt2_tiny",
            f"model.pretrained={ckpt}",
            "data.tokenizer=bpe",  # the checkpoint ships no tokenizer; the BPE trained here is the one it saw
            f"moe={kind}",
            "moe.top_k=2",
            "trainer.max_steps=0",
        )
        s = _cli.summary(run)
        losses[kind] = s["val_loss"]
        assert s["steps"] == 0
    assert abs(losses["switch"] - losses["dense"]) < 1e-5, losses
    assert abs(losses["mpoe"] - losses["dense"]) < 1e-5, losses


def test_t5_checkpoint_too_small_for_sentinels_is_a_config_error(tmp_path):
    from types import SimpleNamespace

    from mpoe.train.data.span_corruption import SpanCorruption

    cfg = tiny_cfg("t5", "dense")
    cfg.trainer.seq_len = 32
    cfg.model.pretrained = str(_save_t5(tmp_path / "t5"))  # VOCAB + 128 rows: room for VOCAB + 100 sentinels
    assert (
        SpanCorruption.for_config(cfg, SimpleNamespace(tokenizer=None, vocab_size=VOCAB, eot_id=0)).sentinels[0]
        == VOCAB + 99
    )
    with pytest.raises(ConfigError, match="sentinel"):
        SpanCorruption.for_config(cfg, SimpleNamespace(tokenizer=None, vocab_size=VOCAB + 40, eot_id=0))
