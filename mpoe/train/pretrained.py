"""`model.pretrained=DIR` checked before anything is set up: its config, its weights, and its tokenizer.

A directory with config.json but no weights failed deep in transformers
(`OSError: Error no file named model.safetensors`). A checkpoint without
tokenizer files was silently paired with a BPE tokenizer trained here, whose
ids mean nothing to the checkpoint's embeddings: that is now an error, unless
the user chooses a tokenizer (`data.tokenizer=FILE`) or asks for the trained
one on purpose (`data.tokenizer=bpe`).
"""

from __future__ import annotations

from pathlib import Path

from mpoe.config import ConfigError, TrainConfig

# What `from_pretrained` reads, whole or sharded (with an index).
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def check(cfg: TrainConfig) -> None:
    path = cfg.model.pretrained
    if not path:
        return
    # Deferred: these import transformers and tokenizers (seconds), which a run without a checkpoint never needs.
    from mpoe.models.family import read_pretrained_config
    from mpoe.train.data import sequences as data_lib

    read_pretrained_config(path, cfg.model.family)  # config.json of the right family
    directory = Path(path).expanduser()
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"model.pretrained={path!r} has config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}): "
            "give the directory `save_pretrained` wrote"
        )
    if cfg.data.tokenizer is None and data_lib.checkpoint_tokenizer_dir(path) is None:
        raise ConfigError(
            f"model.pretrained={path!r} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt), and a "
            "tokenizer trained here would give ids its embeddings never saw: set data.tokenizer=<its tokenizer.json>, "
            f"or data.tokenizer={data_lib.TRAIN_BPE} to train one anyway"
        )
