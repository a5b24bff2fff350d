"""Documents -> token ids -> fixed-length training sequences, the same on every process.

The documents come from `mpoe.train.data.documents`, a batch at a time. The tokenizer
is a byte-level BPE trained with `tokenizers` on the training split and cached
under `data.cache_dir` keyed by the split's fingerprint, or a given
`tokenizer.json`. The token streams are cached too, so later runs start at once:
one raw int32 file per split, written a batch of documents at a time, with the
tokenizer that made them. Every process memory-maps them rather than reads
them, so the processes of a node share one copy of the tokens in the page
cache, and packing them into sequences copies nothing (a batch becomes int64
when it is drawn).

Batches are drawn by `SequenceSampler`: an epoch is a seeded permutation of the
packed sequences, cut into global batches; rank r takes its slice. The position
is a pure function of the optimizer step, which is what makes resume exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer

from mpoe.config import ConfigError, DataConfig
from mpoe.train.data import corpus, documents
from mpoe.train.data.cache_files import write_once
from mpoe.train.data.documents import DocumentSource, cache_root

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]
TRAIN_BPE = "bpe"  # data.tokenizer=bpe: train a BPE on the corpus, chosen explicitly (as null does by default)


def train_tokenizer(docs: Iterable, vocab_size: int):
    """A byte-level BPE trained on `docs` (documents, or batches of them: tokenizers takes either)."""
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        docs, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    return tok


def get_tokenizer(cfg: DataConfig, source: Optional[DocumentSource] = None, train_fingerprint: str = ""):
    """A `tokenizers.Tokenizer`: the given file, or a BPE trained on the source's training split and cached
    under its fingerprint (the source is needed only then)."""
    if cfg.tokenizer and cfg.tokenizer != TRAIN_BPE:
        path = Path(cfg.tokenizer).expanduser()
        if path.is_dir():  # a Hugging Face checkpoint directory (model.pretrained's): its tokenizer files
            return _checkpoint_tokenizer(path)
        if not path.is_file():
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer!r} is not a file: "
                "give a tokenizer.json, a checkpoint directory, or null to train one"
            )
        return Tokenizer.from_file(str(path))
    path = cache_root(cfg) / f"bpe-{train_fingerprint}-{cfg.vocab_size}.json"
    if not path.exists():
        tok = train_tokenizer(source.batches("train", cfg.val_fraction), cfg.vocab_size)
        write_once(path, lambda tmp: tok.save(str(tmp)))
    return Tokenizer.from_file(str(path))


def _checkpoint_tokenizer(path: Path):
    """tokenizer.json, or GPT-2's vocab.json + merges.txt, from a local checkpoint directory."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))._tokenizer
    raise ConfigError(
        f"data.tokenizer={str(path)!r} holds no tokenizer.json (nor vocab.json + merges.txt): "
        f"give a tokenizer file, or null to train one"
    )


def checkpoint_tokenizer_dir(path: Optional[str]) -> Optional[str]:
    """`path` if it is a checkpoint directory holding tokenizer files (for data.tokenizer), else None."""
    if not path or not Path(path).expanduser().is_dir():
        return None
    p = Path(path).expanduser()
    has = (p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())
    return str(p) if has else None


def special_ids(tokenizer) -> tuple[int, int]:
    """(end-of-text, pad): ours, or a pretrained tokenizer's (GPT-2: no pad, use end-of-text; T5: </s>, <pad>)."""
    first = lambda names: next((i for i in map(tokenizer.token_to_id, names) if i is not None), None)
    eot = first([SPECIAL_TOKENS[0], "</s>"])
    if eot is None:
        raise ConfigError(
            "data.tokenizer has no end-of-text token (<|endoftext|> or </s>): use a GPT-2/T5 tokenizer or null"
        )
    pad = first([SPECIAL_TOKENS[1]])
    return eot, eot if pad is None else pad


def encode(tokenizer, docs: list[str]) -> np.ndarray:
    """The documents' token ids as one int32 array, an end-of-text id after each document.

    One `encode_batch` call (tokenizers spreads it over its threads): callers pass a batch of documents
    (`documents.BATCH_DOCS`), since the Encodings (ids, offsets, token strings) are far larger than the ids."""
    eot = special_ids(tokenizer)[0]
    encodings = tokenizer.encode_batch(docs)
    ends = np.cumsum([len(e.ids) + 1 for e in encodings], dtype=np.int64)
    stream = np.full(int(ends[-1]) if len(ends) else 0, eot, dtype=np.int32)  # end-of-text slots stay eot
    for end, e in zip(ends, encodings):
        stream[end - 1 - len(e.ids) : end - 1] = e.ids
    return stream


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: object
    eot_id: int
    pad_id: int
    key: str  # names the cache files: `load_prepared(cfg, key)` maps them without reading any document

    def windows(self, split: str, length: int) -> torch.Tensor:
        """The split ("train" or "val") cut into windows of `length` tokens (`pack`)."""
        return pack(getattr(self, split), length)


def _cache_files(cfg: DataConfig, key: str) -> dict[str, Path]:
    root = cache_root(cfg)
    return {
        "train": root / f"tokens-{key}-train.bin",  # raw int32, as Megatron's and nanoGPT's token files
        "val": root / f"tokens-{key}-val.bin",
        "tokenizer": root / f"tokens-{key}-tokenizer.json",  # the tokenizer that made them
    }


@contextlib.contextmanager
def tokenizer_threads():
    """tokenizers' thread pool on (BPE training and `encode_batch`), where the entry points turn it off
    (TOKENIZERS_PARALLELISM=false, `mpoe.process`): the process that prepares a node's data is the only one
    working then, the node's others wait for its cache."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # read by tokenizers at each call
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def prepare(cfg: DataConfig) -> TokenData:
    """Tokenize the documents and cache the tokens (unless cached), and map the cache.

    Reads the source a batch at a time: once to fingerprint both splits (which names the cache), and, on
    a cache miss, once more to train the BPE (unless given) and once per split to tokenize it."""
    with tokenizer_threads():
        return _prepare(cfg)


def _prepare(cfg: DataConfig) -> TokenData:
    source = documents.document_source(cfg)
    prints = corpus.split_fingerprints(source.documents(), cfg.val_fraction)
    if not prints["train"][1] or not prints["val"][1]:
        raise ConfigError(
            f"data.val_fraction={cfg.val_fraction} leaves an empty split of "
            f"{prints['train'][1] + prints['val'][1]} documents: give more text"
        )
    tokenizer = get_tokenizer(cfg, source, prints["train"][0])
    named_by = json.dumps([prints["train"][0], prints["val"][0], tokenizer.to_str()])
    key = hashlib.sha1(named_by.encode()).hexdigest()[:16]
    files = _cache_files(cfg, key)
    for split in ("train", "val"):
        if not files[split].exists():
            write = lambda tmp, split=split: _encode_to_file(tokenizer, source.batches(split, cfg.val_fraction), tmp)
            write_once(files[split], write)
    if not files["tokenizer"].exists():
        write_once(files["tokenizer"], lambda tmp: tokenizer.save(str(tmp)))
    return load_prepared(cfg, key)


def _encode_to_file(tokenizer, batches: Iterable[list[str]], path: Path) -> None:
    """The token stream of the documents, as raw int32, written a batch of documents at a time."""
    with open(path, "wb") as f:
        for batch in batches:
            encode(tokenizer, batch).tofile(f)


def load_prepared(cfg: DataConfig, key: str) -> Optional[TokenData]:
    """The cached tokens and tokenizer that `prepare` wrote under `key`, or None where they are not all there."""
    files = _cache_files(cfg, key)
    if not all(f.exists() for f in files.values()):
        return None
    # Copy-on-write maps: shared pages, and torch.from_numpy takes them as writable (nothing writes them).
    train, val = (np.memmap(files[split], dtype=np.int32, mode="c") for split in ("train", "val"))
    tokenizer = Tokenizer.from_file(str(files["tokenizer"]))
    return TokenData(train, val, tokenizer.get_vocab_size(), tokenizer, *special_ids(tokenizer), key=key)


def pack(stream: np.ndarray, length: int) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens (the tail that does not fill one is dropped).

    A view of the stream, in its dtype (the memory-mapped int32 cache: no copy); batches are cast when drawn."""
    n = len(stream) // length
    if n == 0:
        raise ConfigError(
            f"a window of {length} tokens (what trainer.seq_len needs) is longer than the {len(stream)} tokens "
            "of a data split: lower trainer.seq_len or add data"
        )
    return torch.from_numpy(stream[: n * length]).view(n, length)


class SequenceSampler:
    """Micro-batches for (step, micro_step, rank): a seeded permutation per epoch, sliced per rank."""

    def __init__(self, sequences: torch.Tensor, micro_batch: int, accum: int, world: int, rank: int, seed: int):
        self.sequences, self.micro_batch, self.accum = sequences, micro_batch, accum
        self.world, self.rank, self.seed = world, rank, seed
        self.global_batch = micro_batch * accum * world
        if len(sequences) < self.global_batch:
            raise ConfigError(
                f"trainer.global_batch_size={self.global_batch} exceeds the {len(sequences)} "
                "training sequences: lower it"
            )
        self.steps_per_epoch = len(sequences) // self.global_batch
        self._perm: Optional[tuple[int, torch.Tensor]] = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.sequences), generator=g))
        return self._perm[1]

    def batch(self, step: int, micro_step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + (micro_step * self.world + self.rank) * self.micro_batch
        return self.sequences[self._permutation(epoch)[start : start + self.micro_batch]].long()


def eval_batches(
    sequences: torch.Tensor, micro_batch: int, max_sequences: int, world: int, rank: int
) -> list[tuple[torch.Tensor, int]]:
    """This rank's share of the validation set, as (micro-batch, sequences that count) pairs.

    The validation set is the first `max_sequences` sequences of the split (all of them
    when the split is smaller), whatever the number of processes: rank r takes sequences
    r, r + world, ... in micro-batches, the last one partial. Every rank gets the same
    number of micro-batches, because each forward of an expert-parallel model is a
    collective; a rank whose share runs out evaluates a filler batch that counts 0.
    """
    n = min(len(sequences), max_sequences)
    mine = sequences[rank:n:world]
    per_rank = math.ceil(math.ceil(n / world) / micro_batch)
    out = []
    for b in range(per_rank):
        batch = mine[b * micro_batch : (b + 1) * micro_batch]
        out.append((batch.long(), len(batch)) if len(batch) else (sequences[:1].long(), 0))
    return out
