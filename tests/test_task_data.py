"""A task's examples as token rows (mpoe.train.data.task_data), checked against ids written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from mpoe.config import ConfigError, DataConfig, ModelConfig, TrainConfig, TrainerConfig
from mpoe.train.data.task_data import IGNORE, Classification, check, prepare

WORDS = ["<|endoftext|>", "<pad>", "[UNK]", "Answer", ":", "topic", "false", "true", "a", "b", "c", "d", "e", "-"]
ID = {w: i for i, w in enumerate(WORDS)}
EOT, PAD = ID["<|endoftext|>"], ID["<pad>"]


def _tokenizer(path: Path) -> str:
    """A word-level tokenizer: every word and punctuation mark is one id of WORDS, so rows can be written by hand."""
    tok = Tokenizer(models.WordLevel(vocab=ID, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<pad>"])
    tok.save(str(path))
    return str(path)


def _task(folder: Path, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> str:
    folder.mkdir()
    for name, rows in (("train", train), ("validation", test), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows))
    return str(folder)


def _cfg(tmp_path: Path, family: str, seq_len: int, **data) -> TrainConfig:
    task = _task(tmp_path / "task", [("a b", 1), ("c d", 0)] * 4, [("a b c", 1), ("d e", 0)])
    return TrainConfig(
        model=ModelConfig(family=family, name=f"{family}_test", max_position_embeddings=None),
        data=DataConfig(name="task", task=task, tokenizer=_tokenizer(tmp_path / "tok.json"), **data),
        trainer=TrainerConfig(seq_len=seq_len),
    )


def test_prompt_rows_score_the_label_word_after_the_answer_cue(tmp_path):
    data = prepare(_cfg(tmp_path, "gpt2", 10))
    assert data.layout == "prompt" and data.label_ids == [ID["false"], ID["true"]]
    inputs, targets = data.rows["test"][0]  # "a b c", label 1
    expected = [ID["a"], ID["b"], ID["c"], ID["Answer"], ID[":"], ID["true"]]
    assert inputs.tolist() == expected + [PAD] * 4
    assert targets.tolist() == [IGNORE] * 5 + [ID["true"]] + [IGNORE] * 4
    objective = Classification(10, data.layout, data.pad_id, data.label_ids)
    batch = objective.batch(data.rows["test"])
    assert set(batch) == {"input_ids", "labels"}  # causal attention: the pads after the answer change nothing
    assert objective.target_tokens(batch, 2) == 2
    # position t's logits predict token t+1: the label word at 5 is predicted by position 4
    logits = torch.arange(10.0).view(1, 10, 1).expand(2, 10, len(WORDS))
    assert objective.answer_logits(logits, batch)[:, 0].tolist() == [4.0, 3.0]  # "d e" is one word shorter


def test_text_to_text_rows_give_the_decoder_the_label_word_then_end_of_text(tmp_path):
    data = prepare(_cfg(tmp_path, "t5", 8))
    assert data.layout == "text_to_text"
    inputs, targets = data.rows["test"][1]  # "d e", label 0
    # the task's name is the directory's ("task"), which this tokenizer does not know: one [UNK] id
    assert inputs.tolist() == [ID["[UNK]"], ID[":"], ID["d"], ID["e"], EOT, PAD, PAD, PAD]
    assert targets.tolist()[:2] == [ID["false"], EOT] and set(targets.tolist()[2:]) == {IGNORE}
    objective = Classification(8, data.layout, data.pad_id, data.label_ids)
    batch = objective.batch(data.rows["test"])
    assert batch["labels"].tolist() == [[ID["true"], EOT], [ID["false"], EOT]]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # the pads, exactly
    logits = torch.arange(2.0).view(1, 2, 1).expand(2, 2, len(WORDS))
    assert objective.answer_logits(logits, batch)[:, 0].tolist() == [0.0, 0.0]  # the decoder's first position


def test_long_texts_are_cut_so_the_answer_always_fits(tmp_path):
    cfg = _cfg(tmp_path, "gpt2", 5)
    inputs, targets = prepare(cfg).rows["test"][0]  # "a b c" + "Answer :" + label: 6 ids in 5
    assert inputs.tolist() == [ID["a"], ID["b"], ID["Answer"], ID[":"], ID["true"]]
    assert targets.tolist() == [IGNORE] * 4 + [ID["true"]]


def test_a_label_word_of_several_tokens_is_one_line_before_the_run(tmp_path):
    cfg = _cfg(tmp_path, "gpt2", 8, task_label_words=["not-ok", "true"])
    with pytest.raises(ConfigError, match=r"^data.task_label_words: 'not-ok' is 3 tokens of the tokenizer, not one"):
        check(cfg)  # what preflight runs before any process starts
