"""The package installs as GPU users install it: a built wheel, in a fresh environment, run from another
directory (the Hydra configs travel inside the package)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _cli import FAST, env, summary

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_built_wheel_trains_from_another_directory(tmp_path, mpoe_cache):
    # Built from a copy of what the package is made of, so no stale build/ folder of the checkout can leak in.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "mpoe", source / "mpoe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    build.append(str(source))
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("mpoe-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert "mpoe/conf/train.yaml" in z.namelist() and "mpoe/conf/moe/mpoe.yaml" in z.namelist()

    # A fresh environment that sees the installed stack (torch, DeepSpeed, ...) but gets mpoe from the wheel only.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    pip += ["--ignore-installed", str(wheel)]  # this environment's own copy, whatever the base has
    subprocess.run(pip, check=True, capture_output=True, timeout=600)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    e = env(mpoe_cache)
    e.pop("PYTHONPATH", None)
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mpoe; print(mpoe.__file__)"],
        cwd=elsewhere,
        env=e,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(venv)), where.stdout
    proc = subprocess.run(
        [
            str(venv / "bin" / "mpoe-train"),
            "hydra.run.dir=run",
            *FAST,
            "trainer.max_steps=2",
            "logging.wandb.mode=disabled",
        ],
        cwd=elsewhere,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(elsewhere / "run")["steps"] == 2
