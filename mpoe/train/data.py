"""Text -> token ids -> fixed-length training sequences, the same on every process.

Sources (`data=`): the embedded CPython corpus (`embedded`), local text/json/parquet
files read through `datasets` (`text`), or a dataset on the hub when online (`hub`).
The tokenizer is a byte-level BPE trained with `tokenizers` on the training split
and cached under `data.cache_dir` keyed by the corpus fingerprint, or a given
`tokenizer.json`. The token stream is cached too, so later runs start at once:
one int32 `.npy` file per split, which every process memory-maps rather than
reads, so the processes of a node share one copy of the tokens in the page
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
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mpoe.config import ConfigError, DataConfig
from mpoe.train import corpus

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]
TRAIN_BPE = "bpe"  # data.tokenizer=bpe: train a BPE on the corpus, chosen explicitly (as null does by default)
_DATA_EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def cache_root(cfg: DataConfig) -> Path:
    # An empty MPOE_CACHE (`export MPOE_CACHE=`) means unset, not the working directory.
    root = Path(cfg.cache_dir or os.environ.get("MPOE_CACHE") or Path.home() / ".cache" / "mpoe").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, validation) documents for the configured source."""
    if cfg.name == "embedded":
        return corpus.split_documents(corpus.embedded_documents(cfg.embedded_part, cache_root(cfg)), cfg.val_fraction)
    import datasets

    if cfg.name == "text":
        docs = local_documents([Path(p).expanduser() for p in cfg.paths], cfg.text_field)
    else:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split="train")
        if cfg.text_field not in ds.column_names:
            raise ConfigError(
                f"data.text_field={cfg.text_field!r} is not a column of the data: use one of {ds.column_names}"
            )
        docs = [t for t in ds[cfg.text_field] if t and t.strip()]
    return corpus.split_documents(docs, cfg.val_fraction)


def local_documents(paths: list[Path], text_field: str) -> list[str]:
    """The documents of local files, in the order given; text, JSON and parquet files may be mixed.

    Files of one kind are read by one `datasets` loader call; a file it cannot read
    is named in a one-line ConfigError, with the line or row where the format has one.
    """
    for p in paths:
        if not p.is_file():
            raise ConfigError(
                f"data.paths entry {str(p)!r} is not a file: give existing .txt/.json/.jsonl/.parquet files"
            )
        if _DATA_EXTENSIONS.get(p.suffix.lower()) is None:
            raise ConfigError(
                f"data.paths entry {str(p)!r} has an unknown type {p.suffix!r}: "
                f"use {', '.join(sorted(_DATA_EXTENSIONS))} files"
            )
        if p.stat().st_size == 0:
            raise ConfigError(f"data.paths entry {str(p)!r} is empty: remove it from data.paths or give it text")
    docs: list[str] = []
    for kind in dict.fromkeys(_DATA_EXTENSIONS[p.suffix.lower()] for p in paths):  # first-seen order
        files = [p for p in paths if _DATA_EXTENSIONS[p.suffix.lower()] == kind]
        docs.extend(_load_kind(kind, files, "text" if kind == "text" else text_field))
    return docs


def _load_kind(kind: str, files: list[Path], field: str) -> list[str]:
    import datasets

    try:
        with _quiet_logger("datasets"):  # it logs the failure before raising; we say it once, in one line
            ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except Exception as e:  # datasets/pyarrow raise many kinds for one bad file: find it and say where
        raise ConfigError(_unreadable(kind, files, e)) from None
    if field not in ds.column_names:
        raise ConfigError(
            f"data.text_field={field!r} is not a column of {', '.join(map(str, files))}: use one of {ds.column_names}"
        )
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreadable(kind: str, files: list[Path], error: Exception) -> str:
    """One line naming the first file (and line) that `kind`'s loader cannot read."""
    for p in files:
        where = _first_bad_line(kind, p)
        if where:
            return f"data.paths entry {str(p)!r} cannot be read as {kind}: {where}"
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    return f"data.paths {', '.join(map(str, files))} cannot be read as {kind}: {type(cause).__name__}: {detail}"


def _first_bad_line(kind: str, path: Path) -> str | None:
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
        except Exception as e:  # pyarrow's errors for a foreign or truncated file
            return f"not a parquet file ({(str(e).splitlines() or [''])[0][:120]})"
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return f"line {line} is not UTF-8 text (byte {e.start}): is it a binary file?"
    if kind != "json":
        return None
    if path.suffix.lower() == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            json.loads(text)
            return None
        except ValueError:
            pass  # perhaps JSON Lines under a .json name: check line by line
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            return f"line {number} is not JSON ({e.msg})"
        if not isinstance(record, dict):
            return f"line {number} is a JSON {type(record).__name__}, not an object with a text field"
    return None


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        docs, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    return tok


def get_tokenizer(cfg: DataConfig, train_docs: list[str]):
    """A `tokenizers.Tokenizer`: the given file, or a BPE trained on the corpus and cached."""
    from tokenizers import Tokenizer

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
    path = cache_root(cfg) / f"bpe-{corpus.fingerprint(train_docs)}-{cfg.vocab_size}.json"
    if not path.exists():
        tok = train_tokenizer(train_docs, cfg.vocab_size)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
    return Tokenizer.from_file(str(path))


def _checkpoint_tokenizer(path: Path):
    """tokenizer.json, or GPT-2's vocab.json + merges.txt, from a local checkpoint directory."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from tokenizers import ByteLevelBPETokenizer

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


ENCODE_BATCH_DOCS = 4096  # documents per `encode_batch` call: its Encodings (ids, offsets, token strings) are large


def encode(tokenizer, docs: list[str]) -> np.ndarray:
    """One flat int32 stream of token ids with an end-of-text token after every document.

    Encoded in batches of documents (`tokenizers` spreads each over its threads), each turned into an
    int32 array at once: the peak is about twice the tokens' int32 size, not a Python list of them."""
    eot = special_ids(tokenizer)[0]
    parts = [np.zeros(0, dtype=np.int32)]
    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        encodings = tokenizer.encode_batch(docs[start : start + ENCODE_BATCH_DOCS])
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
        part = np.full(int(lengths.sum()), eot, dtype=np.int32)  # the end-of-text slots stay eot
        for end, e in zip(np.cumsum(lengths), encodings):
            part[end - 1 - len(e.ids) : end - 1] = e.ids
        parts.append(part)
    return np.concatenate(parts)


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: object
    eot_id: int
    pad_id: int
    key: str  # names the cache files: `load_prepared(cfg, key)` maps them without reading any document


def _cache_files(cfg: DataConfig, key: str) -> dict[str, Path]:
    root = cache_root(cfg)
    return {
        "train": root / f"tokens-{key}-train.npy",
        "val": root / f"tokens-{key}-val.npy",
        "tokenizer": root / f"tokens-{key}-tokenizer.json",  # the tokenizer that made them
    }


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)  # concurrent processes never map or parse half a file


def prepare(cfg: DataConfig) -> TokenData:
    """Load the documents, tokenize and cache (unless cached), and map the cache."""
    train_docs, val_docs = load_documents(cfg)
    if not train_docs or not val_docs:
        raise ConfigError(
            f"data.val_fraction={cfg.val_fraction} leaves an empty split of "
            f"{len(train_docs) + len(val_docs)} documents: give more text"
        )
    tokenizer = get_tokenizer(cfg, train_docs)
    key = hashlib.sha1(
        json.dumps([corpus.fingerprint(train_docs), corpus.fingerprint(val_docs), tokenizer.to_str()]).encode()
    ).hexdigest()[:16]
    files = _cache_files(cfg, key)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if not files[split].exists():
            _write_atomically(files[split], lambda tmp, docs=docs: np.save(tmp, encode(tokenizer, docs)))
    if not files["tokenizer"].exists():
        _write_atomically(files["tokenizer"], lambda tmp: tokenizer.save(str(tmp)))
    return load_prepared(cfg, key)


def load_prepared(cfg: DataConfig, key: str) -> Optional[TokenData]:
    """The cached tokens and tokenizer that `prepare` wrote under `key`, or None where they are not all there."""
    from tokenizers import Tokenizer

    files = _cache_files(cfg, key)
    if not all(f.exists() for f in files.values()):
        return None
    # Copy-on-write maps: shared pages, and torch.from_numpy takes them as writable (nothing writes them).
    train, val = (np.load(files[split], mmap_mode="c") for split in ("train", "val"))
    tokenizer = Tokenizer.from_file(str(files["tokenizer"]))
    return TokenData(train, val, tokenizer.get_vocab_size(), tokenizer, *special_ids(tokenizer), key=key)


def pack(stream: np.ndarray, length: int) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens (the tail that does not fill one is dropped).

    A view of the stream, in its dtype (the memory-mapped int32 cache: no copy); batches are cast when drawn."""
    n = len(stream) // length
    if n == 0:
        raise ConfigError(
            f"trainer.seq_len={length - 1} is longer than the {len(stream)} tokens of a data split: "
            "lower it or add data"
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
