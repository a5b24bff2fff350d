"""The launch scripts, run for real on this machine: two torchrun "nodes" on loopback, DeepSpeed's
launcher with a localhost hostfile, and the bad inputs that must fail in one line, never hang."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import FAST, env, metrics

from mpoe.parallel.process_groups import free_port

ROOT = Path(__file__).resolve().parents[1]
RUN = ["moe=switch", "parallel.ep_size=2", "logging.wandb.mode=disabled", *FAST]


def _script(name: str, extra_env: dict, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launch" / name), *args], env={**extra_env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_nodes_on_loopback_train_expert_parallel(tmp_path, mpoe_cache, zero_stage):
    run = tmp_path / "run"
    port = free_port()
    args = [*RUN, f"parallel.zero_stage={zero_stage}", f"hydra.run.dir={run}"]
    nodes = []
    for node_rank in (0, 1):
        e = {
            **env(mpoe_cache),
            "NNODES": "2",
            "NODE_RANK": str(node_rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RDZV_TIMEOUT": "120",
            "RDZV_ID": f"test-{port}",
        }
        nodes.append(
            subprocess.Popen(
                ["bash", str(ROOT / "launch" / "torchrun.sh"), *args],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000004").glob("rank_*.pt")) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]


@pytest.mark.slow
def test_deepspeed_launcher_with_a_localhost_hostfile(tmp_path, mpoe_cache):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    proc = _script(
        "deepspeed.sh",
        {**env(mpoe_cache), "HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port())},
        *RUN,
        "parallel.zero_stage=1",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(metrics(run)) == 4


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("localhost slot=2\n", "is malformed"),
        ("# nobody\n", "lists no hosts"),
        ("a slots=1\na slots=2\n", "twice"),
    ],
)
def test_bad_hostfile_is_one_line(tmp_path, mpoe_cache, content, fragment):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(content)
    proc = _script("deepspeed.sh", {**env(mpoe_cache), "HOSTFILE": str(hostfile)}, *RUN, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr


def _deepspeed_args(tmp_path, mpoe_cache, **environment) -> subprocess.CompletedProcess:
    """launch/deepspeed.sh on a two-host hostfile, with a `deepspeed` on PATH that prints what it was given."""
    hostfile, fake = tmp_path / "hostfile", tmp_path / "bin" / "deepspeed"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\necho "ENV_FILE ${DS_ENV_FILE:-}"\n')
    fake.chmod(0o755)
    e = {**env(mpoe_cache), "HOSTFILE": str(hostfile), "PATH": f"{fake.parent}:{os.environ['PATH']}", **environment}
    return _script("deepspeed.sh", e, "moe=switch", timeout=120)


def test_deepspeed_sh_over_ssh_lets_deepspeed_find_the_first_host_and_passes_mpoes_variables(tmp_path, mpoe_cache):
    proc = _deepspeed_args(tmp_path, mpoe_cache, WANDB_PROJECT="mine")
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split("\n")[0]
    assert "--no_ssh" not in args and "--master_addr" not in args  # DeepSpeed asks the first host (hostname -I)
    env_file = Path(proc.stdout.split("ENV_FILE ")[1].strip())
    lines = env_file.read_text().splitlines()
    assert f"MPOE_CACHE={mpoe_cache}" in lines and "WANDB_PROJECT=mine" in lines and "DS_ACCELERATOR=cpu" in lines
    assert env_file.stat().st_mode & 0o077 == 0  # it may hold an API key: the user's only


def test_deepspeed_sh_without_ssh_on_several_hosts_takes_the_given_first_host(tmp_path, mpoe_cache):
    proc = _deepspeed_args(tmp_path, mpoe_cache, NO_SSH="1", NODE_RANK="1", MASTER_ADDR="10.0.0.7")
    assert proc.returncode == 0, proc.stderr
    assert "--master_addr 10.0.0.7" in proc.stdout and "--no_ssh --node_rank 1" in proc.stdout


def test_deepspeed_sh_without_ssh_on_several_hosts_needs_the_first_hosts_address(tmp_path, mpoe_cache):
    proc = _deepspeed_args(tmp_path, mpoe_cache, NO_SSH="1", NODE_RANK="1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "launch/deepspeed.sh: error: NO_SSH=1 with 2 hosts needs MASTER_ADDR, the first host's address, on every node"
    )


def test_ep_size_not_dividing_the_world_is_one_line_before_launch(mpoe_cache):
    e = {**env(mpoe_cache), "NNODES": "1", "NPROC_PER_NODE": "3"}
    proc = _script("torchrun.sh", e, "moe=switch", "parallel.ep_size=2", timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "mpoe-train: error: parallel.ep_size=2 is invalid: must divide the world size 3 (processes)"
    )


def test_unreachable_rendezvous_fails_in_one_line_within_its_timeout(mpoe_cache):
    e = {
        **env(mpoe_cache),
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_TIMEOUT": "3",
    }
    start = time.monotonic()
    proc = _script("torchrun.sh", e, *RUN, timeout=120)
    assert proc.returncode == 2
    assert "unreachable after 3s" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_sweep_under_torchrun_runs_each_job_in_a_new_world(tmp_path, mpoe_cache):
    """Each job of a Hydra sweep starts its own process group on torchrun's store: the second must not read the
    first's rendezvous keys (it hung there until the timeout)."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mpoe.train"]
    args = ["-m", "trainer.seed=0,1", f"hydra.sweep.dir={sweep}", *FAST, "trainer.max_steps=2", "trainer.eval_every=2"]
    proc = subprocess.run(
        [*cmd, *args, "logging.wandb.mode=disabled"], env=env(mpoe_cache), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [next(sweep.glob(f"{job}_*")) for job in (0, 1)]  # the sweep's subdirectories: number_overrides
    assert [[r["step"] for r in metrics(job)] for job in jobs] == [[1, 2], [1, 2]]


def _sbatch(tmp_path, *args, **environment) -> subprocess.CompletedProcess:
    """launch/slurm.sbatch as SLURM runs it (a copy, elsewhere), with an srun on PATH that prints what it runs."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text('#!/usr/bin/env bash\necho "SRUN $*"\n')
    # A large allocation's node list, written line by line: a reader that stops after the first line leaves the
    # writer to die of SIGPIPE, which pipefail would turn into the script's failure.
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\nfor i in $(seq 20000); do echo node-$i; done\n")
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    copy = tmp_path / "spool" / "slurm_script"
    copy.parent.mkdir(exist_ok=True)
    copy.write_text((ROOT / "launch" / "slurm.sbatch").read_text())
    e = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
        **environment,
    }
    return subprocess.run(["bash", str(copy), *args], env=e, capture_output=True, text=True, cwd=tmp_path, timeout=60)


def test_slurm_sbatch_resumes_unless_told_and_finds_its_launch_folder(tmp_path):
    proc = _sbatch(tmp_path, "moe=switch")
    assert proc.returncode == 0, proc.stderr
    assert f"{ROOT / 'launch'} trainer.resume=auto moe=switch" in proc.stdout
    proc = _sbatch(tmp_path, "trainer.resume=null", "moe=switch")
    assert "resume=auto" not in proc.stdout and "trainer.resume=null moe=switch" in proc.stdout
    proc = _sbatch(tmp_path, "moe=switch", SLURM_SUBMIT_DIR=str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"launch/slurm.sbatch: error: no torchrun.sh in {tmp_path / 'launch'}: submit from the mpoe checkout, "
        "or set MPOE_LAUNCH_DIR to its launch/ folder"
    )
    proc = _sbatch(tmp_path, "moe=switch", SLURM_SUBMIT_DIR=str(tmp_path), MPOE_LAUNCH_DIR=str(ROOT / "launch"))
    assert proc.returncode == 0 and "trainer.resume=auto moe=switch" in proc.stdout
