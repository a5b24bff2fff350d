"""Checkpoints written atomically, one file per rank, and read back exactly.

Layout: `RUN_DIR/checkpoints/step_00000100/{meta.json, rank_00000.pt, ...}`.
Every rank writes its own state (its module state: shared parameters plus its
local experts; its optimizer state, a ZeRO partition at stage 1/2; the LR
scheduler; its RNG states; what a data-parallel replica holds exactly as the
first replica does is stored by the first only: `reshard.rank_file_fields`)
into a hidden temporary directory; after a barrier
rank 0 writes `meta.json` last and renames the directory into place, so a
`step_*` directory either is complete or does not exist: a crash mid-save
leaves the previous checkpoint as it was.

Why not `engine.save_checkpoint`: it writes in place (a crash mid-save corrupts
the newest checkpoint), it does not save the RNG states that exact resume
needs, and its MoE layout assumes DeepSpeed's own expert naming
(`deepspeed_moe.experts.deepspeed_experts.N`), which has no place for an MPOE
central tensor shared by all experts.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch

from mpoe.parallel.collectives import host_barrier
from mpoe.parallel.deepspeed.optimizer_state import load_native_state
from mpoe.parallel.process_groups import rank_world
from mpoe.train.checkpoint import reshard
from mpoe.train.checkpoint.rng import rng_state, set_rng_state
from mpoe.train.runtime.faults import NONE as NO_FAULTS
from mpoe.train.runtime.faults import Faults

STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; one-line message with the path and the fix."""


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a directory without meta.json is not one)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(engine, ckpt_dir: Path, step: int, meta: dict, keep_last: int, faults: Faults = NO_FAULTS) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    rank, world = rank_world()
    final = ckpt_dir / f"{STEP_PREFIX}{step:08d}"
    if (final / "meta.json").is_file() and unreadable(final) is None:
        return final  # already saved (e.g. a resumed run that was finished): never overwrite a good checkpoint
    tmp = ckpt_dir / f".tmp-{final.name}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
        tmp.mkdir()
    host_barrier()  # the directory exists (barriers over files are host agreements: no GPU work is waited for)
    state = {
        **reshard.rank_file_fields(engine, rank, meta["ep_size"]),  # collective at ZeRO 1/2
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "global_steps": engine.global_steps,
        "rng": rng_state(),
    }
    part = tmp / f"rank_{rank:05d}.pt.partial"
    torch.save(state, part)
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, tmp / f"rank_{rank:05d}.pt")
    host_barrier()
    if rank == 0:
        faults.saving(step)
        _fsync_write(tmp / "meta.json", json.dumps({**meta, "step": step, "world_size": world}, indent=1).encode())
        shutil.rmtree(final, ignore_errors=True)  # one that cannot be read (a rank file cut short): replaced
        os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    host_barrier()
    return final


def unreadable(path: Path) -> Optional[str]:
    """Why checkpoint `path` cannot be loaded (its meta.json, or a rank file missing or cut short), or None.

    Reads meta.json and each rank file's zip directory (torch's file format), not the tensors: a file cut
    short, by a full disk or a copy that stopped, has lost the directory at its end."""
    try:
        world = int(json.loads((path / "meta.json").read_text()).get("world_size") or 1)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        return f"meta.json cannot be read ({type(e).__name__})"
    for rank in range(world):
        file = path / f"rank_{rank:05d}.pt"
        try:
            size = file.stat().st_size
            with zipfile.ZipFile(file) as z:
                end = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
        except FileNotFoundError:
            return f"{file.name} is missing"
        except (OSError, zipfile.BadZipFile):
            return f"{file.name} is cut short or corrupt (not a complete torch file)"
        if end > size:
            return f"{file.name} is cut short ({size} of at least {end} bytes)"
    return None


def newest_readable(ckpt_dir: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """(the newest complete checkpoint that can be read or None, the newer ones that cannot, newest first)."""
    skipped = []
    for path in reversed(complete_checkpoints(ckpt_dir)):
        reason = unreadable(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def resolve(resume: Optional[str], ckpt_dir: Path) -> Optional[Path]:
    """`auto`: the newest checkpoint in this run that can be read (None if the run has none; CheckpointError if
    it has some and none can be read); a path: that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        found, skipped = newest_readable(ckpt_dir)
        if found is None and skipped:
            newest, reason = skipped[0]
            raise CheckpointError(
                f"trainer.resume=auto: none of the {len(skipped)} checkpoint(s) in {ckpt_dir} can be read (the "
                f"newest, {newest.name}: {reason}): give a new hydra.run.dir to start again"
            )
        return found
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / "meta.json").is_file():  # a run dir or its checkpoints/ dir
        found = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
        if found:
            return found[-1]
    if not (path / "meta.json").is_file():
        raise CheckpointError(
            f"trainer.resume={resume!r} is not a complete checkpoint (no meta.json): "
            f"give a {STEP_PREFIX}N directory, a run directory, 'auto' or null"
        )
    return path


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable meta.json ({e}): pick another checkpoint") from None


def load(engine, path: Path, layout: dict, must_match: dict, placement=None, num_experts: int = 0) -> dict:
    """Collective: restore this rank's state; returns the checkpoint's meta.

    `must_match` (model, moe kind, experts) must equal the checkpoint's; a different
    `layout` (world size, ep_size, ZeRO stage) is resharded (see reshard.py).
    """
    rank, world = rank_world()
    meta = read_meta(path)
    for key, value in must_match.items():
        if meta.get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} was saved with {key}={meta.get(key)!r}, this run has "
                f"{key}={value!r}: resume with the same setting"
            )
    if any(meta.get(key) != value for key, value in layout.items()):
        try:
            return reshard.load_resharded(
                engine, path, meta, placement.ep_rank, num_experts // placement.ep_size, num_experts, rank
            )
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint {path} cannot be resharded to {layout} ({e}): resume with "
                f"world_size={meta.get('world_size')} ep_size={meta.get('ep_size')} zero_stage={meta.get('zero_stage')}"
            ) from None
    file = path / f"rank_{rank:05d}.pt"
    try:
        state = reshard.with_replica_fields(
            torch.load(file, map_location="cpu", weights_only=False), path, rank, meta["ep_size"]
        )
    except Exception as e:  # torch raises many kinds on a truncated or foreign file
        raise CheckpointError(
            f"checkpoint file {file} cannot be read ({type(e).__name__}): pick an earlier checkpoint"
        ) from None
    try:
        engine.module.load_state_dict(state["module"])
    except RuntimeError as e:  # torch lists every tensor whose shape differs, over many lines
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), _first(e))
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({first[:300]}): resume with the model settings it was "
            "saved with"
        ) from None
    load_native_state(engine, state["optimizer"], world)
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    set_rng_state(state["rng"])
    return meta


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
