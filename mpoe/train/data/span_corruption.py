"""T5's pre-training objective: span corruption (Raffel et al. 2020, `random_spans_noise_mask`).

A window of `raw_length` tokens has round(raw_length * 0.15) of them chosen as
noise, in round(noise / 3) spans (mean span length 3). The encoder input is the
window with each noise span replaced by one sentinel (<extra_id_0>, <extra_id_1>,
... in order) followed by EOS; the target is each sentinel followed by the span
it replaced, then EOS. `raw_length` and the target length come from T5's
`random_spans_helper`, so the input is exactly `trainer.seq_len` tokens and
neither side needs padding (the counts do not depend on the random draw).

Choices:
- Sentinels: the tokenizer's own `<extra_id_N>` if it has them (a pretrained T5
  checkpoint's tokenizer); otherwise the 100 ids just above the tokenizer's
  vocabulary, highest first, which `mpoe.models.t5` adds to the model.
- EOS: the tokenizer's `</s>` if it has one, else the end-of-text id that
  separates documents in the packed stream.
- Randomness: each row's mask comes from a generator seeded by (trainer.seed,
  the row's tokens), so a batch always corrupts the same way, whichever step,
  rank or resume produces it, and evaluation batches are identical each time.
- Loss: the decoder's cross-entropy over the target tokens (HF shifts the
  labels right to make the decoder input, starting from the pad id), which is
  what validation loss and perplexity report for T5.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from mpoe.config import ConfigError, TrainConfig
from mpoe.models import t5

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def _lengths(tokens_length: int, noise_density: float, mean_span: float) -> tuple[int, int, int, int]:
    """(inputs length, targets length, noise tokens, noise spans) for a raw window, EOS included."""
    num_noise = int(round(tokens_length * noise_density))
    num_noise = min(max(num_noise, 1), tokens_length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1, num_noise, num_spans


def random_spans_helper(
    inputs_length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """T5's: the raw length whose corrupted input is `inputs_length` tokens, and the target length."""
    tokens_length = inputs_length - 1
    while _lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = _lengths(tokens_length, noise_density, mean_noise_span_length)[:2]
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        targets -= 1
    return tokens_length, targets


def _segment_lengths(num_items: int, num_segments: int, g: torch.Generator) -> torch.Tensor:
    """A uniformly random split of num_items into num_segments positive lengths."""
    cuts = torch.randperm(num_items - 1, generator=g)[: num_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([num_items])])
    return bounds.diff()


def noise_mask(length: int, noise_density: float, mean_span: float, g: torch.Generator) -> torch.Tensor:
    """Bool [length]: T5's random_spans_noise_mask (spans alternate, non-noise first)."""
    _, _, num_noise, num_spans = _lengths(length, noise_density, mean_span)
    noise = _segment_lengths(num_noise, num_spans, g)
    keep = _segment_lengths(length - num_noise, num_spans, g)
    # The mask flips at the end of every run but the last: a cumulative count of flips, odd inside noise runs.
    # (Built per row on the host each step, where repeat_interleave of the runs is the slower way.)
    ends = torch.stack([keep, noise], 1).flatten().cumsum(0)[:-1]
    flips = torch.zeros(length, dtype=torch.int32)
    flips[ends] = 1
    return flips.cumsum(0) % 2 == 1


@dataclass
class SpanCorruption:
    raw_length: int
    inputs_length: int
    targets_length: int
    sentinels: Sequence[int] = field(repr=False)  # sentinels[i] = <extra_id_i>
    eos_id: int
    seed: int = 0
    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH

    @classmethod
    def for_inputs_length(
        cls,
        inputs_length: int,
        sentinels: Sequence[int],
        eos_id: int,
        seed: int = 0,
        noise_density: float = NOISE_DENSITY,
        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    ) -> SpanCorruption:
        raw, targets = random_spans_helper(inputs_length, noise_density, mean_noise_span_length)
        spans = _lengths(raw, noise_density, mean_noise_span_length)[3]
        if spans > len(sentinels):
            raise ConfigError(
                f"trainer.seq_len={inputs_length} makes {spans} noise spans, more than the "
                f"{len(sentinels)} sentinel tokens: lower it"
            )
        return cls(raw, inputs_length, targets, list(sentinels), eos_id, seed, noise_density, mean_noise_span_length)

    @classmethod
    def for_config(cls, cfg: TrainConfig, token_data) -> SpanCorruption:
        """Sentinels and EOS from the run's tokenizer (see the module docstring)."""
        tok = getattr(token_data, "tokenizer", None)
        own = _token_ids(tok, [f"<extra_id_{i}>" for i in range(t5.NUM_SENTINELS)])
        sentinels = own if own is not None else t5.sentinel_ids(token_data.vocab_size)
        eos = _token_ids(tok, ["</s>"])
        if cfg.model.pretrained:
            rows = t5.FAMILY.check_pretrained(cfg.model.pretrained).get("vocab_size", 0)
            if max(sentinels) >= rows:
                raise ConfigError(
                    f"model.pretrained={cfg.model.pretrained!r} has {rows} token embeddings, too few for "
                    f"the sentinel id {max(sentinels)}: "
                    "use the checkpoint's tokenizer (data.tokenizer=<checkpoint dir>)"
                )
        return cls.for_inputs_length(
            cfg.trainer.seq_len, sentinels, eos[0] if eos else token_data.eot_id, cfg.trainer.seed
        )

    def _generator(self, row: torch.Tensor) -> torch.Generator:
        digest = hashlib.blake2b(row.numpy().astype("int64").tobytes(), digest_size=8, key=str(self.seed).encode())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)

    def _spans_to_sentinels(self, row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each run of True in `mask` becomes one sentinel (<extra_id_0> for the first run, ...)."""
        starts = mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])
        index = (starts.long().cumsum(0) - 1).clamp_min(0)
        sentinels = torch.as_tensor(self.sentinels, dtype=row.dtype)
        return torch.where(starts, sentinels[index], row)[~mask | starts]

    def corrupt(self, row: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) for one raw row and its noise mask, as T5 makes them.

        The mask alternates non-noise/noise runs starting with non-noise, so replacing the
        non-noise runs by sentinels gives the target <extra_id_0> span_0 <extra_id_1> span_1 ...
        """
        eos = row.new_tensor([self.eos_id])
        return (
            torch.cat([self._spans_to_sentinels(row, mask), eos]),
            torch.cat([self._spans_to_sentinels(row, ~mask), eos]),
        )

    def batch(self, raw: torch.Tensor) -> dict:
        if raw.shape[-1] != self.raw_length:
            raise ValueError(f"raw windows have {raw.shape[-1]} tokens, span corruption expects {self.raw_length}")
        inputs, targets = [], []
        for row in raw:
            mask = noise_mask(self.raw_length, self.noise_density, self.mean_noise_span_length, self._generator(row))
            i, t = self.corrupt(row, mask)
            inputs.append(i)
            targets.append(t)
        return {"input_ids": torch.stack(inputs), "labels": torch.stack(targets)}

    def target_tokens(self, batch: dict, counted: int) -> int:
        return counted * batch["labels"].shape[1]


def _token_ids(tokenizer, tokens: list[str]) -> Optional[list[int]]:
    """The ids of all `tokens` in the tokenizer, or None if any is missing (or there is no tokenizer)."""
    if tokenizer is None or not hasattr(tokenizer, "token_to_id"):
        return None
    ids = [tokenizer.token_to_id(t) for t in tokens]
    return None if any(i is None for i in ids) else ids
