"""T5: MoE layers in encoder and decoder, sentinel vocabulary, span corruption invariants, training end to end."""

import pytest
import torch
from test_models import VOCAB, tiny_cfg
from transformers import T5Config

from mpoe.models import t5
from mpoe.models.build import build_model, moe_layers
from mpoe.parallel.expert_placement import ExpertPlacement
from mpoe.train.data.span_corruption import SpanCorruption, random_spans_helper

SENTINELS = t5.sentinel_ids(1000)


def test_sentinel_vocabulary_is_t5s():
    assert t5.model_vocab_size(32000) == 32128  # T5: 32000 pieces + 100 extra ids, padded
    assert t5.sentinel_ids(32000)[:2] == [32099, 32098]  # <extra_id_0> = 32099, as T5's tokenizer
    assert min(t5.sentinel_ids(4096)) == 4096 and max(t5.sentinel_ids(4096)) < t5.model_vocab_size(4096)


def test_moe_layers_in_encoder_and_decoder():
    cfg = tiny_cfg("t5", "mpoe")
    cfg.model.num_layers, cfg.model.num_decoder_layers = 4, 2
    model = build_model(cfg, VOCAB, 0, 1, ExpertPlacement())
    from mpoe.models.moe_layer import MoELayer

    kinds = lambda stack: [isinstance(b.layer[-1].DenseReluDense, MoELayer) for b in stack.block]
    assert kinds(model.backbone.encoder) == [False, True, False, True]
    assert kinds(model.backbone.decoder) == [False, True]
    assert len(moe_layers(model)) == 3
    assert all(layer.bank.b_in is None for layer in moe_layers(model))  # T5 FFNs have no biases
    assert model.backbone.config.vocab_size == t5.model_vocab_size(VOCAB)


def test_gated_t5_activation():
    assert t5.feed_forward_activation(T5Config(feed_forward_proj="relu")) == "relu"
    assert t5.feed_forward_activation(T5Config(feed_forward_proj="gated-gelu")) == "gated-gelu_new"


@pytest.mark.parametrize("seq_len", [16, 64, 128, 512])
def test_lengths_are_t5s(seq_len):
    raw, targets = random_spans_helper(seq_len)
    if seq_len == 512:
        assert (raw, targets) == (568, 114)  # T5's published numbers for inputs_length 512
    sc = SpanCorruption.for_inputs_length(seq_len, SENTINELS, eos_id=1)
    batch = sc.batch(torch.randint(2, 900, (8, sc.raw_length), generator=torch.Generator().manual_seed(seq_len)))
    assert batch["input_ids"].shape == (8, seq_len)  # no padding anywhere
    assert batch["labels"].shape == (8, targets)


def _reconstruct(inp: list[int], tgt: list[int]) -> list[int]:
    """Put each sentinel's span back into the input."""
    spans, current = {}, None
    for tok in tgt[:-1]:
        if tok in SENTINELS:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    out = []
    for tok in inp[:-1]:
        out.extend(spans[tok] if tok in SENTINELS else [tok])
    return out


def test_span_corruption_invariants():
    sc = SpanCorruption.for_inputs_length(128, SENTINELS, eos_id=1, seed=3)
    raw = torch.randint(2, 900, (16, sc.raw_length), generator=torch.Generator().manual_seed(0))
    batch = sc.batch(raw)
    noise = 0
    for row, inp, tgt in zip(raw.tolist(), batch["input_ids"].tolist(), batch["labels"].tolist()):
        assert inp[-1] == 1 and tgt[-1] == 1  # EOS ends both
        in_sent = [t for t in inp if t in SENTINELS]
        tgt_sent = [t for t in tgt if t in SENTINELS]
        assert in_sent == tgt_sent == SENTINELS[: len(in_sent)]  # <extra_id_0>, 1, ... in order
        assert tgt[0] == SENTINELS[0]
        assert _reconstruct(inp, tgt) == row  # targets hold exactly the dropped spans
        noise += len(tgt) - 1 - len(tgt_sent)
        assert len(tgt_sent) == round(round(0.15 * sc.raw_length) / 3)
    assert noise / raw.numel() == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize("length", [40, 568])
def test_the_noise_mask_is_its_runs_written_out(length):
    """Non-noise and noise runs alternate, non-noise first, with the lengths the generator draws."""
    from mpoe.train.data.span_corruption import _lengths, _segment_lengths, noise_mask

    _, _, num_noise, num_spans = _lengths(length, 0.15, 3.0)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        noise = _segment_lengths(num_noise, num_spans, g).tolist()
        keep = _segment_lengths(length - num_noise, num_spans, g).tolist()
        runs = [flag for k, n in zip(keep, noise) for flag in [False] * k + [True] * n]
        assert noise_mask(length, 0.15, 3.0, torch.Generator().manual_seed(seed)).tolist() == runs


def test_span_corruption_is_seeded_by_content():
    sc = SpanCorruption.for_inputs_length(64, SENTINELS, eos_id=1, seed=0)
    raw = torch.randint(2, 900, (4, sc.raw_length), generator=torch.Generator().manual_seed(1))
    a, b = sc.batch(raw), sc.batch(raw.clone())
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # one row alone corrupts as it does in the batch: independent of batch position / rank
    assert torch.equal(sc.batch(raw[2:3])["input_ids"][0], a["input_ids"][2])
    other = SpanCorruption.for_inputs_length(64, SENTINELS, eos_id=1, seed=1).batch(raw)
    assert not torch.equal(other["input_ids"], a["input_ids"])
    # two identical rows in different batches, different masks across different rows
    assert not torch.equal(a["input_ids"][0], a["input_ids"][1])


def test_too_many_spans_for_sentinels_is_a_config_error():
    from mpoe.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.seq_len"):
        SpanCorruption.for_inputs_length(4096, SENTINELS, eos_id=1)


def test_uses_a_tokenizers_own_sentinels():
    from types import SimpleNamespace

    class Tok:
        vocab = {f"<extra_id_{i}>": 500 + i for i in range(100)} | {"</s>": 1}

        def token_to_id(self, t):
            return self.vocab.get(t)

    cfg = tiny_cfg("t5")
    cfg.trainer.seq_len = 32
    sc = SpanCorruption.for_config(cfg, SimpleNamespace(tokenizer=Tok(), vocab_size=600, eot_id=0))
    assert sc.sentinels[:2] == [500, 501] and sc.eos_id == 1
    sc = SpanCorruption.for_config(cfg, SimpleNamespace(tokenizer=None, vocab_size=600, eot_id=0))
    assert sc.sentinels[0] == 699 and sc.eos_id == 0


@pytest.mark.slow
def test_t5_tiny_trains_from_the_cli(tmp_path, mpoe_cache):
    import _cli

    run = tmp_path / "run"
    _cli.train(
        run,
        mpoe_cache,
        "model=t5_tiny",
        "moe=mpoe",
        "trainer.max_steps=10",
        "trainer.eval_every=10",
        "trainer.log_every=5",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
    )
    m = _cli.metrics(run)
    s = _cli.summary(run)
    assert m[-1]["step"] == 10 and m[-1]["loss"] < m[0]["loss"]
    assert s["val_loss"] > 0 and s["params_switch_equivalent"] > s["params_total"]
