"""Export: save -> load gives identical logits; --merge (MPOE -> dense expert weights) keeps the outputs.

Dense -> HF."""

import subprocess
import sys

import pytest
import torch
from test_models import VOCAB, tiny_batch, tiny_cfg

from mpoe.models.build import build_model, moe_layers
from mpoe.models.experts import MPOEExperts, SwitchExperts
from mpoe.parallel.expert_placement import ExpertPlacement
from mpoe.tools import export


def _trained(family, kind, steps=3, **moe):
    """A model whose experts have diverged a little (so merging is not trivially the init)."""
    cfg = tiny_cfg(family, kind, **moe)
    model = build_model(cfg, VOCAB, 0, 1, ExpertPlacement())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(steps):
        loss = model(**tiny_batch(family, cfg, seed=s)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cfg


def _logits(model, family, cfg):
    with torch.no_grad():
        return model(**tiny_batch(family, cfg, seed=99), return_logits=True).logits


@pytest.mark.parametrize("kind", ["dense", "switch", "mpoe"])
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_save_load_round_trip_is_exact(tmp_path, family, kind):
    model, cfg = _trained(family, kind)
    export.save(model, cfg, tmp_path / "out")
    loaded, loaded_cfg = export.load(tmp_path / "out")
    assert loaded_cfg.moe.kind == kind
    assert torch.equal(_logits(loaded, family, cfg), _logits(model, family, cfg))
    if kind == "dense":  # a plain Hugging Face checkpoint too
        from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

        cls = AutoModelForCausalLM if family == "gpt2" else T5ForConditionalGeneration
        hf = cls.from_pretrained(tmp_path / "out" / "hf", local_files_only=True).eval()
        batch = tiny_batch(family, cfg, seed=99)
        with torch.no_grad():
            ref = hf(**batch).logits
        torch.testing.assert_close(ref, _logits(model, family, cfg), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_merge_keeps_outputs(tmp_path, family):
    model, cfg = _trained(family, "mpoe", top_k=2, aux_init_noise=0.1)
    before = _logits(model, family, cfg)
    assert export.merge_mpoe(model) == len(moe_layers(model)) > 0
    assert all(isinstance(layer.bank, SwitchExperts) for layer in moe_layers(model))
    torch.testing.assert_close(_logits(model, family, cfg), before, rtol=1e-4, atol=1e-5)
    # every expert's merged weight is different (they diverged from the shared init)
    bank = moe_layers(model)[0].bank
    assert not torch.allclose(bank.w_in[0], bank.w_in[1])
    cfg.moe.kind = "switch"
    export.save(model, cfg, tmp_path / "merged")
    loaded, loaded_cfg = export.load(tmp_path / "merged")
    assert loaded_cfg.moe.kind == "switch"
    assert torch.equal(_logits(loaded, family, cfg), _logits(model, family, cfg))


@pytest.mark.slow
def test_cli_exports_a_training_run(tmp_path, mpoe_cache):
    """mpoe-train -> checkpoints/step_N -> python -m mpoe.tools.export RUN OUT [--merge] -> same logits."""
    import _cli

    run = tmp_path / "run"
    _cli.train(
        run, mpoe_cache, "model=gpt2_tiny", "moe=mpoe", "moe.top_k=2", "trainer.max_steps=2", "trainer.eval_every=2"
    )
    plain, merged = tmp_path / "plain", tmp_path / "merged"
    for out, extra in ((plain, []), (merged, ["--merge"])):
        subprocess.run(
            [sys.executable, "-m", "mpoe.tools.export", str(run), str(out), *extra],
            check=True,
            env=_cli.env(mpoe_cache),
            capture_output=True,
            text=True,
            timeout=300,
        )
    a, cfg_a = export.load(plain)
    b, cfg_b = export.load(merged)
    assert (cfg_a.moe.kind, cfg_b.moe.kind) == ("mpoe", "switch")
    assert any(isinstance(layer.bank, MPOEExperts) for layer in moe_layers(a))
    # the export equals the checkpoint's weights
    _, ckpt = export.find_checkpoint(run)
    state = torch.load(ckpt / "rank_00000.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    ids = {"input_ids": torch.randint(2, 4096, (2, 32), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        la, lb = a(**ids, return_logits=True).logits, b(**ids, return_logits=True).logits
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)


def test_the_export_model_tags_the_expert_parameters_as_training_does():
    """The rank files of an expert-parallel run are joined by these tags (they were lost on the meta -> CPU move)."""
    from mpoe.models.param_tags import is_expert_param

    cfg = tiny_cfg("gpt2", "mpoe")
    trained = build_model(cfg, VOCAB, 0, 1, ExpertPlacement())
    rebuilt = export.build_from_hf_config(cfg, trained.backbone.config)
    tagged = lambda model: [name for name, p in model.named_parameters() if is_expert_param(p)]
    assert tagged(rebuilt) == tagged(trained) and len(tagged(trained)) > 0


@pytest.mark.slow
def test_a_bf16_expert_parallel_run_exports_its_float32_masters(tmp_path, mpoe_cache):
    """DeepSpeed trains bf16 weights as float32 masters and rounds them into the module: the export holds the
    masters (rounding them gives the checkpoint's bf16 weights), gathered over the expert-parallel ranks."""
    import _cli

    from mpoe.models.param_tags import is_expert_param

    run, out = tmp_path / "run", tmp_path / "out"
    _cli.train(
        run, mpoe_cache, "moe=mpoe", "trainer.precision=bf16", "parallel.ep_size=2", "trainer.max_steps=2", nproc=2
    )
    export.export(run, out)
    model, _ = export.load(out)
    _, ckpt = export.find_checkpoint(run)
    ranks = [torch.load(ckpt / f"rank_{r:05d}.pt", map_location="cpu", weights_only=False)["module"] for r in (0, 1)]
    finer = 0
    for name, p in model.named_parameters():
        saved = torch.cat([s[name] for s in ranks]) if is_expert_param(p) else ranks[0][name]
        assert p.dtype == torch.float32 and saved.dtype == torch.bfloat16
        assert torch.equal(p.detach().to(torch.bfloat16), saved), name
        finer += not torch.equal(p.detach(), saved.float())
    assert finer == len(list(model.parameters()))  # every trained weight has bits its bf16 rounding lost

    # The same checkpoint with an expert tensor gone from rank 1's file: one line naming it, and nothing written.
    name = next(n for n, p in model.named_parameters() if is_expert_param(p))
    state = torch.load(ckpt / "rank_00001.pt", map_location="cpu", weights_only=False)
    del state["module"][name]
    torch.save(state, ckpt / "rank_00001.pt")
    with pytest.raises(export.ExportError, match=f"{name}: saved by 1 of the 2 expert-parallel ranks") as error:
        export.export(run, tmp_path / "out2")
    assert "\n" not in str(error.value) and not (tmp_path / "out2").exists()
