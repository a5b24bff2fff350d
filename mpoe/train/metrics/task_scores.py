"""Accuracy of a fine-tuned model on a task's validation and test splits, and every example's prediction.

A prediction is the argmax over the label words' logits at the answer position (`Classification.answer_logits`).
All ranks run every batch (an expert-parallel forward is a collective); rank r predicts examples r, r + world, ...
and the predictions are gathered once per split. The run directory gets `predictions.json` (label and
prediction of every example, in the split's order: the same in every run of the task, which is what pairs two
variants' predictions example by example in the study's bootstrap); the summary gets the accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from mpoe.train.data import sequences as data_lib
from mpoe.train.data.task_data import Classification, TaskData

SCORED_SPLITS = ("val", "test")


@torch.no_grad()
def predict(engine, data: TaskData, split: str, objective: Classification, micro_batch: int) -> list[int]:
    """The predicted label of every example of `split`, in order, on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = data.rows[split]
    label_ids = torch.tensor(objective.label_ids, device=engine.device)
    engine.eval()
    mine = []
    for raw, counted in data_lib.eval_batches(rows, micro_batch, len(rows), world, rank):
        batch = {k: v.to(engine.device) for k, v in objective.batch(raw).items()}
        logits = engine(**batch, return_logits=True).logits
        scores = objective.answer_logits(logits, batch)[:, label_ids]
        mine.append(scores.argmax(dim=1)[:counted])
    engine.train()
    local = torch.cat(mine).tolist() if mine else []  # one read per split
    if world == 1:
        return local
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    ordered = [0] * len(rows)
    for r, predictions in enumerate(gathered):
        ordered[r::world] = predictions
    return ordered


def score(engine, data: TaskData, objective: Classification, micro_batch: int, run_dir: Path, write: bool) -> dict:
    """Accuracy on each scored split (summary keys); `write`: rank 0 writes run_dir/predictions.json."""
    summary = {"task": data.task.name, "label_words": list(data.task.label_words)}
    predictions = {}
    for split in SCORED_SPLITS:
        labels = [e.label for e in data.task.splits[split]]
        predicted = predict(engine, data, split, objective, micro_batch)
        correct = sum(p == y for p, y in zip(predicted, labels))
        summary[f"{split}_accuracy"] = correct / max(len(labels), 1)
        summary[f"{split}_examples"] = len(labels)
        predictions[split] = {"label": labels, "predicted": predicted}
    if write:
        path = Path(run_dir) / "predictions.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(predictions))
        tmp.replace(path)
    return summary
