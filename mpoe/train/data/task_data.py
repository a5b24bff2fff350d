"""A classification task as token rows: what `data=task` trains and scores on.

Each example becomes one fixed-size row of shape [2, trainer.seq_len]: row 0 the model's input ids, row 1 the
target ids (-100 where nothing is scored), so that the sampler, the validation batches and resume treat
examples exactly as they treat language-model windows. Two layouts, by what the model family pre-trains on:

- prompt (decoder-only, GPT-2): "<text a>\\n<text b>\\nAnswer:" followed by the label word; the loss is on the
  answer token only. The prompt's texts are cut from their ends to fit; the label word always fits.
- text to text (encoder-decoder, T5): the encoder reads "<task>: <text a>\\n<text b>"; the decoder's target is
  the label word then end-of-text, as T5 fine-tunes on GLUE.

Every label word must be one token of the model's tokenizer, so that a prediction is the argmax over the label
words' scores at one position (`Classification.answer_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpoe.config import ConfigError, TrainConfig, derive
from mpoe.models import family as families
from mpoe.train.data import sequences as data_lib
from mpoe.train.data.tasks import Example, Task, load_task

IGNORE = -100
SPLITS = ("train", "val", "test")
# How each family's pre-training objective reads a classification example.
LAYOUTS = {"causal_lm": "prompt", "span_corruption": "text_to_text"}


@dataclass
class TaskData:
    """The task's splits as rows [examples, 2, seq_len], with the tokenizer that made them."""

    task: Task
    rows: dict[str, torch.Tensor]
    label_ids: list[int]  # the token id of each label's word
    layout: str  # prompt | text_to_text
    vocab_size: int
    tokenizer: object
    eot_id: int
    pad_id: int

    def windows(self, split: str, length: int) -> torch.Tensor:
        """The split's rows, encoded at `length` tokens (trainer.seq_len)."""
        rows = self.rows[split]
        if rows.shape[-1] != length:
            raise ValueError(f"the task's rows have {rows.shape[-1]} tokens, the objective expects {length}")
        return rows


def check(cfg: TrainConfig) -> None:
    """Before any process starts: the task's files, and its label words where the tokenizer is known without
    training one (data.tokenizer, or model.pretrained's); one-line ConfigError."""
    task = load_task(cfg.data)
    data = cfg.data
    if cfg.model.pretrained and not data.tokenizer:
        data = derive(data, tokenizer=data_lib.checkpoint_tokenizer_dir(cfg.model.pretrained))
    if data.tokenizer and data.tokenizer != data_lib.TRAIN_BPE:
        _label_ids(data_lib.get_tokenizer(data), task)


def prepare(cfg: TrainConfig) -> TaskData:
    """Load the task (one-line ConfigError on bad files) and encode every split with the run's tokenizer."""
    task = load_task(cfg.data)
    layout = LAYOUTS[families.get(cfg.model.family).objective]
    tokenizer = _tokenizer(cfg, task)
    eot, pad = data_lib.special_ids(tokenizer)
    label_ids = _label_ids(tokenizer, task)
    encode = _prompt_row if layout == "prompt" else _text_to_text_row
    rows = {}
    for split in SPLITS:
        examples = task.splits[split]
        rows[split] = torch.stack(
            [encode(tokenizer, task.name, e, label_ids[e.label], cfg.trainer.seq_len, eot, pad) for e in examples]
        )
    return TaskData(task, rows, label_ids, layout, tokenizer.get_vocab_size(), tokenizer, eot, pad)


def _tokenizer(cfg: TrainConfig, task: Task):
    """The run's tokenizer (the checkpoint's or data.tokenizer), or a BPE trained on the task's training texts."""
    if cfg.data.tokenizer and cfg.data.tokenizer != data_lib.TRAIN_BPE:
        return data_lib.get_tokenizer(cfg.data)
    texts = [t for e in task.splits["train"] for t in (e.text_a, e.text_b) if t]
    # Each label word twice, so that it becomes one token: the BPE merges only pairs seen at least twice.
    texts += [f" {word}" for word in task.label_words] * 2
    with data_lib.tokenizer_threads():
        return data_lib.train_tokenizer(texts, cfg.data.vocab_size)._tokenizer


def _label_ids(tokenizer, task: Task) -> list[int]:
    ids = [_one_token(tokenizer, word) for word in task.label_words]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"data.task_label_words={list(task.label_words)} map to the same token: give distinct words")
    return ids


def _one_token(tokenizer, word: str) -> int:
    """The id of ` word` (as it follows a space in the prompt), which must be a single token."""
    ids = tokenizer.encode(f" {word}", add_special_tokens=False).ids
    if len(ids) != 1:
        raise ConfigError(
            f"data.task_label_words: {word!r} is {len(ids)} tokens of the tokenizer, not one: choose label words "
            f"that are one token each (data.task_label_words=[...])"
        )
    return ids[0]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _texts(tokenizer, example: Example, budget: int) -> list[int]:
    """Text a (and text b after a newline) in at most `budget` tokens, each cut from its end, b first."""
    a = _ids(tokenizer, example.text_a)
    b = _ids(tokenizer, "\n" + example.text_b) if example.text_b else []
    over = len(a) + len(b) - budget
    if over > 0 and b:
        cut = min(over, max(len(b) - budget // 2, 0))
        b, over = b[: len(b) - cut], over - cut
    if over > 0:
        a = a[: max(len(a) - over, 0)]
    return (a + b)[:budget]


def _row(inputs: list[int], targets: list[int], length: int, pad: int) -> torch.Tensor:
    row = torch.full((2, length), IGNORE, dtype=torch.long)
    row[0].fill_(pad)
    row[0, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
    row[1, : len(targets)] = torch.tensor(targets, dtype=torch.long)
    return row


def _prompt_row(tokenizer, task_name: str, example: Example, label_id: int, length: int, eot: int, pad: int):
    """[texts, "\\nAnswer:", label word]; the target row scores the label word at its own position."""
    suffix = _ids(tokenizer, "\nAnswer:")
    body = _texts(tokenizer, example, length - len(suffix) - 1)
    inputs = body + suffix + [label_id]
    targets = [IGNORE] * (len(inputs) - 1) + [label_id]
    return _row(inputs, targets, length, pad)


def _text_to_text_row(tokenizer, task_name: str, example: Example, label_id: int, length: int, eot: int, pad: int):
    """Encoder input "<task>: texts" + end-of-text; decoder target [label word, end-of-text]."""
    prefix = _ids(tokenizer, f"{task_name}: ")
    body = _texts(tokenizer, example, length - len(prefix) - 1)
    return _row(prefix + body + [eot], [label_id, eot], length, pad)


@dataclass
class Classification:
    """The objective of data=task: rows -> model inputs, and where a row's answer is scored."""

    raw_length: int
    layout: str
    pad_id: int
    label_ids: list[int]

    @classmethod
    def for_config(cls, cfg: TrainConfig, data: TaskData) -> Classification:
        return cls(cfg.trainer.seq_len, data.layout, data.pad_id, data.label_ids)

    def batch(self, raw: torch.Tensor) -> dict:
        inputs, targets = raw[:, 0], raw[:, 1]
        if self.layout == "prompt":  # causal attention: the pads after the answer change nothing before it
            return {"input_ids": inputs, "labels": targets}
        return {"input_ids": inputs, "labels": targets[:, :2], "attention_mask": (inputs != self.pad_id).long()}

    def target_tokens(self, batch: dict, counted: int) -> int:
        """Scored tokens in the first `counted` rows of a CPU batch."""
        return int((batch["labels"][:counted] != IGNORE).sum())

    def answer_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """[B, V] logits of the position that predicts each row's label word."""
        if self.layout == "text_to_text":
            return logits[:, 0]
        # The label word sits at the first scored position; the logits one position earlier predict it.
        position = (batch["labels"] != IGNORE).long().argmax(dim=1) - 1
        return logits[torch.arange(len(logits), device=logits.device), position]
