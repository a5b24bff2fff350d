"""The package's layering: models and parallel never import the training code or the tools above it, and
importing a model module changes nothing global (only the entry points configure the process)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mpoe"


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names, in-function imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_models_and_parallel_do_not_import_train_or_tools():
    offenders = {}
    for layer in ("models", "parallel"):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            bad = sorted(m for m in _imported_modules(path) if m.startswith(("mpoe.train", "mpoe.tools")))
            if bad:
                offenders[str(path.relative_to(PACKAGE))] = bad
    assert offenders == {}


def test_importing_the_moe_layer_leaves_the_environment_and_the_allocator_alone():
    # The libraries ours import set variables of their own when imported; ours may add none.
    probe = """
import json, os
import torch, deepspeed, deepspeed.moe.layer, transformers
from megatron.core.transformer.moe import moe_utils
before_env = dict(os.environ)
import mpoe.parallel.deepspeed.accelerator as accelerator
calls = []
accelerator.keep_freed_cpu_memory = lambda: calls.append("mallopt")
import mpoe.models.moe_layer, mpoe.parallel.dispatch
changed = sorted(k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k))
print(json.dumps({"env": changed, "allocator": calls}))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"env": [], "allocator": []}
