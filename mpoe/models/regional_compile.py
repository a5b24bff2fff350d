"""`trainer.compile`: torch.compile each transformer block on its own (regional compilation).

Why blocks rather than the whole model:
- Identical blocks share one compiled graph: Dynamo compiles a block's code once and
  passes each block's parameters in as graph inputs, so compile time does not grow
  with depth. torchtitan compiles its MoE transformers this way, and it is PyTorch's
  "regional compilation" recipe.
- HF's model-level code stays eager, the causal mask above all. There HF decides from
  the real inputs that SDPA may run causal without a mask (flash attention); traced,
  it has to build a mask.
- `nn.Module.compile` compiles in place, so parameter names, the state dict,
  DeepSpeed's parameter groups and checkpoints stay the eager model's. A compiled
  run's checkpoint resumes without compile, and the other way round.

The chunked LM loss's per-chunk math (`lm_loss.chunk_math_fusable`) is compiled too, as
torchtitan compiles its loss; the head's GEMMs around it stay as they are.

Compiled blocks run without HF's KV cache. A cache object passed through the blocks
makes Dynamo guard on each layer's slot in it, and so compile every block separately.

On the GPU path at ep_size 1 (sync-free dispatch, grouped experts, bf16) each block
is one graph (tests/test_compile.py checks this with fullgraph=True). Code that reads
counts on the host runs eagerly inside the compiled blocks (`torch.compiler.disable`),
where it splits a block's graph:
- the loop backend (per-expert counts), and the CPU's local dispatch (the kept count);
- expert parallelism's all-to-all, there and back (split sizes);
- the grouped backend in fp32, which falls back to the loop op, because torch's
  compile-time grouped_mm takes bf16 only.
Traced instead, every new list of counts would be one more compilation, until Dynamo's
recompile limit turned the rest of the block eager (tests/test_dispatch.py checks that
a compiled expert-parallel layer stops compiling once it has seen two routings).
"""

from __future__ import annotations

import torch
import torch._dynamo

from mpoe.models import family as families
from mpoe.models import lm_loss
from mpoe.models.build import LanguageModel


def compile_blocks(model: LanguageModel, backend: str = "inductor", fullgraph: bool = False) -> int:
    """Compile every transformer block of `model` in place; returns how many. Compilation itself happens at the
    first forward of each distinct block."""
    blocks = families.get(model.family).blocks(model.backbone)
    # No KV cache: compiled, a block would trace the cache's updates. The price, for GPT-2: without a cache HF checks
    # the position ids for packed sequences with one host read per forward (`gpt2.py`), one sync per micro-batch.
    model.kv_cache = False
    # A family's blocks share one code object (their class's forward), and Dynamo keeps at most `recompile_limit`
    # graphs per code object: two per distinct block structure (training; evaluation under no_grad). T5 has six
    # structures (per stack: the first block, which owns the position bias, dense and MoE blocks), 12 graphs,
    # past the default 8, beyond which Dynamo would silently run the other blocks eagerly. Two per block
    # covers any layout.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * len(blocks))
    # trainer.activation_checkpointing: a MoE layer records its losses on itself in forward (LanguageModel reads
    # them); the recompute in backward need not record them again, and Dynamo traces a checkpointed block whole
    # only when told that it need not.
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks:
        block.compile(backend=backend, fullgraph=fullgraph)
    # The chunked LM loss's elementwise math too (as torchtitan compiles its loss): fused, one reduction and one
    # pass writing the gradient per chunk of [rows, vocab], where eager makes about five in float32.
    model.lm_chunk_math = torch.compile(lm_loss.chunk_math_fusable, backend=backend, fullgraph=fullgraph)
    return len(blocks)
