"""Export a trained model: `python -m mpoe.tools.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--merge]`.

Input: a run directory (its newest checkpoint) or a `checkpoints/step_N` directory;
the run's config is read from `RUN_DIR/.hydra/config.yaml`. A bf16/fp16 run is
exported with its float32 master weights, not their half-precision rounding. An expert-parallel
run's experts are gathered from the rank files of the first expert-parallel
group (ranks 0..ep_size-1 hold every expert once).

Output, in OUT_DIR:
- `model.pt`: our format, {format, config (TrainConfig as a dict), hf_config,
  family, pad_id, state_dict}; `load(OUT_DIR)` rebuilds the model (HF backbone
  from hf_config, MoE layers from the config) and `load_state_dict`s it, strict.
- `config.yaml`: the config, readable.
- `hf/`: for dense models, the backbone as a plain Hugging Face checkpoint
  (`save_pretrained`), loadable by `from_pretrained` or as `model.pretrained`.

`--merge`: each MPOE expert bank becomes a `SwitchExperts` bank holding every
expert's contracted (dense) weights, and the exported config says moe.kind=switch:
outputs are unchanged up to float rounding, and the model no longer needs MPO code.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig

from mpoe.config import MoEConfig, TrainConfig, derive, read_only
from mpoe.models import family as families
from mpoe.models.experts import DenseFFN, MPOEExperts, SwitchExperts
from mpoe.models.param_tags import is_expert_param, to_empty_keeping_tags
from mpoe.parallel.expert_placement import ExpertPlacement
from mpoe.train.checkpoint import store as checkpoint
from mpoe.train.checkpoint.adam_state import portable_forms
from mpoe.train.checkpoint.reshard import RankFiles, join_ep_group
from mpoe.train.data import sequences as data_lib

if TYPE_CHECKING:
    from mpoe.models.build import LanguageModel

FORMAT = "mpoe-export-1"
BPE_EOT_ID, BPE_PAD_ID = 0, 1  # mpoe.train.data.sequences.SPECIAL_TOKENS are the BPE's first ids


def config_from_yaml(path: Union[str, Path]) -> TrainConfig:
    """A run's config as it trained (read-only: what the export changes goes into copies)."""
    return read_only(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))))


def config_to_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def find_checkpoint(path: Union[str, Path]) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run directory or a step_N directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path} does not exist or is not a directory: give a run directory or its step_N checkpoint")
    if (path / "meta.json").is_file():
        run_dir = path.parent.parent
    else:
        found = checkpoint.complete_checkpoints(path / "checkpoints")
        if not found:
            raise ExportError(
                f"{path} is neither a checkpoint (no meta.json) nor a run directory with checkpoints/step_*: "
                "give the directory mpoe-train wrote (outputs/DATE/TIME) or one of its checkpoints/step_N"
            )
        run_dir, path = path, found[-1]
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise ExportError(
            f"{run_dir} has no .hydra/config.yaml, so the model's config is unknown: "
            "export from inside the run directory mpoe-train wrote"
        )
    return run_dir, path


class ExportError(FileNotFoundError):
    """A source that cannot be exported; the message is one line naming the path and the fix."""


def _special_ids(cfg: TrainConfig) -> tuple[int, int]:
    if cfg.data.tokenizer and cfg.data.tokenizer != data_lib.TRAIN_BPE:
        return data_lib.special_ids(data_lib.get_tokenizer(cfg.data))
    return BPE_EOT_ID, BPE_PAD_ID


def backbone_config(cfg: TrainConfig, state: dict):
    """The HF config of the trained backbone: the pretrained checkpoint's, else ours with the trained vocabulary."""
    if cfg.model.pretrained and (Path(cfg.model.pretrained) / "config.json").is_file():
        return AutoConfig.from_pretrained(cfg.model.pretrained, local_files_only=True)
    eot, pad = _special_ids(cfg)
    family = families.get(cfg.model.family)
    rows = state["backbone." + family.token_embedding_key()].shape[0]
    return family.hf_config(cfg.model, rows, eot, pad)


def build_from_hf_config(cfg: TrainConfig, hf_config, placement: Optional[ExpertPlacement] = None) -> LanguageModel:
    """The model's structure (weights to be loaded): backbone from hf_config, MoE layers from cfg.moe."""
    # Deferred: build imports DeepSpeed and Megatron, which `__main__`'s configure_process must precede.
    from mpoe.models.build import LanguageModel, install_moe, moe_layers

    placement = placement or ExpertPlacement()
    family = families.get(cfg.model.family)
    backbone = family.from_config(copy.deepcopy(hf_config))
    if cfg.moe.kind != "dense":
        with torch.device("meta"):  # no init (nor SVDs: see mpo.decompose); the state dict brings the values
            install_moe(backbone, cfg, placement, upcycle=False)
        for layer in moe_layers(backbone):
            to_empty_keeping_tags(layer, "cpu")  # expert parameters stay tagged: the rank files are joined by them
    return LanguageModel(backbone, cfg.model.family, family.pad_id(backbone, BPE_PAD_ID))


def load_run_state(files: RankFiles, ep_size: int, model: nn.Module) -> dict:
    """The full module state: rank 0's, with expert parameters gathered over the first expert-parallel group."""
    states = [files(r)["module"] for r in range(ep_size)]
    state = dict(states[0])
    if ep_size > 1:
        for name, p in model.named_parameters(remove_duplicate=False):
            if is_expert_param(p):
                state[name] = join_ep_group(name, [s.get(name) for s in states], expert=True)
    return state


def load_float32_masters(files: RankFiles, ep_size: int, model: nn.Module) -> int:
    """Put a bf16/fp16 run's float32 master weights into `model`; returns how many parameters got one.

    The masters are what the optimizer trained; the module's half-precision weights only round them (DeepSpeed's
    `zero_to_fp32` recovers the same from its own checkpoints). A float32 run's weights are their own masters
    (none stored), and so are frozen ones: those keep the module's weights.
    """
    experts = {name for name, p in model.named_parameters() if is_expert_param(p)}
    forms = portable_forms(files, ep_size, lambda rank, name: rank == 0 or name in experts)
    if any(form is None for form in forms):  # an older checkpoint with no optimizer state by name
        return 0
    loaded = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            saved = [form["params"].get(name, {}).get("master") for form in forms]
            master = join_ep_group(name, saved, name in experts)
            if master is not None:
                p.copy_(master)
                loaded += 1
    return loaded


def merge_mpoe(model: nn.Module) -> int:
    """Replace every MPOE expert bank by a SwitchExperts bank with the contracted weights; returns how many."""
    # Deferred: build imports DeepSpeed and Megatron, which `__main__`'s configure_process must precede.
    from mpoe.models.build import moe_layers

    merged = 0
    for layer in moe_layers(model):
        bank = layer.bank
        if not isinstance(bank, MPOEExperts):
            continue
        with torch.no_grad():
            denses = []
            for e in range(bank.num_local_experts):
                w = {name: bank.expert_weight(name, e).detach().clone() for name in bank.central}
                b_in, b_out = (None if p is None else p[e].detach().clone() for p in (bank.b_in, bank.b_out))
                denses.append(DenseFFN(w["w_in"], b_in, w["w_out"], b_out, w.get("w_gate")))
        local = range(bank.first_expert, bank.first_expert + bank.num_local_experts)
        new = SwitchExperts(bank.num_experts, local, denses, bank.activation)
        new.mark_expert_params(layer.expert_group_name)
        layer.bank = new
        merged += 1
    return merged


def save(model: LanguageModel, cfg: TrainConfig, out_dir: Union[str, Path]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_to_dict(cfg)
    torch.save(
        {
            "format": FORMAT,
            "config": cfg_dict,
            "hf_config": model.backbone.config.to_dict(),
            "family": model.family,
            "pad_id": model.pad_id,
            "state_dict": model.state_dict(),
        },
        out / "model.pt",
    )
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg_dict))
    if cfg.moe.kind == "dense":
        model.backbone.save_pretrained(out / "hf")
        if cfg.data.tokenizer:
            src = Path(cfg.data.tokenizer)
            for f in (
                [src]
                if src.is_file()
                else [
                    src / n
                    for n in (
                        "tokenizer.json",
                        "tokenizer_config.json",
                        "vocab.json",
                        "merges.txt",
                        "special_tokens_map.json",
                    )
                ]
            ):
                if f.is_file():
                    shutil.copy(f, out / "hf" / f.name)
    return out


def load(out_dir: Union[str, Path]) -> tuple[LanguageModel, TrainConfig]:
    """A model exported by `save`, rebuilt and loaded (strict)."""
    blob = torch.load(Path(out_dir) / "model.pt", map_location="cpu", weights_only=False)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{out_dir}/model.pt is not an {FORMAT} export")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), blob["config"]))
    hf_config = families.get(blob["family"]).config_class.from_dict(blob["hf_config"])
    model = build_from_hf_config(cfg, hf_config)
    model.pad_id = blob["pad_id"]
    model.load_state_dict(blob["state_dict"])
    return model.eval(), cfg


def export(src: Union[str, Path], out_dir: Union[str, Path], merge: bool = False) -> Path:
    """A run (or one of its checkpoints) -> OUT_DIR (see the module docstring)."""
    run_dir, ckpt = find_checkpoint(src)
    trained = config_from_yaml(run_dir / ".hydra" / "config.yaml")
    cfg = derive(trained, parallel=derive(trained.parallel, ep_size=1))  # the export holds every expert
    files = RankFiles(ckpt)  # each rank file read once (memory-mapped), for the weights and for the masters
    ep_size = int(json.loads((ckpt / "meta.json").read_text()).get("ep_size", 1))
    model = build_from_hf_config(cfg, backbone_config(cfg, files(0)["module"]))
    try:
        model.load_state_dict(load_run_state(files, ep_size, model))
        load_float32_masters(files, ep_size, model)
    except RuntimeError as e:  # an incomplete or mismatched checkpoint (reshard.join_ep_group, load_state_dict)
        message = str(e).splitlines()[0]
        raise ExportError(f"checkpoint {ckpt} cannot be exported ({message}): export another checkpoint") from None
    if merge and merge_mpoe(model):
        cfg = derive(cfg, moe=merged_moe_config(cfg.moe))
    return save(model.eval(), cfg, out_dir)


def merged_moe_config(moe: MoEConfig) -> MoEConfig:
    """The MoE config of a model whose MPOE banks `merge_mpoe` made Switch banks: without the settings that act on
    MPO tensors (gradient mask, weight recompute), which a Switch config refuses."""
    return derive(moe, kind="switch", grad_mask=derive(moe.grad_mask, enabled=False), recompute_mpo_weights=False)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mpoe.tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a run directory (its newest checkpoint) or a checkpoints/step_N directory")
    parser.add_argument("out_dir")
    parser.add_argument("--merge", action="store_true", help="MPOE experts -> dense (Switch) expert weights")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out_dir, args.merge)
    except ExportError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported to {out}")


if __name__ == "__main__":
    from mpoe.process import configure_process

    configure_process()
    main()
