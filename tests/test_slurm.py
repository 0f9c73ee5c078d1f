"""SLURM: the allocation check, preemption (SIGUSR1 -> checkpoint, requeue, exit; the requeued job resumes the same
curve) and `litft slurm`'s sbatch scripts. The recipe runs under the variables SLURM sets for a task; `scontrol`
and `sbatch` are stand-ins on PATH that record their arguments (SLURM itself is not under test)."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from conftest import concurrently

from litft.commands.slurm import slurm, slurm_passthrough

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "instruct" / "oasst_first_turn_100.alpaca.json"
STEPS = 200  # the tiny model takes about 100 steps a second: long enough to be interrupted
JOB_ID = "4242"


def slurm_env(tmp_path: Path, tasks: int = 1, nodes: int = 1, restart_count: int | None = None) -> dict[str, str]:
    """The variables SLURM sets for task 0 of a job, and a PATH with a recording `scontrol`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "scontrol"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls.txt"}\n')
    recorder.chmod(0o755)
    env = {
        **os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "litft-test", "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks // nodes), "SLURM_NNODES": str(nodes), "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost",
    }
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    return env


def finetune_args(checkpoint: Path, out_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "litft", "finetune", "lora", "--checkpoint", str(checkpoint), "--out_dir", str(out_dir),
        "--data.path", str(DATA), "--data.max_seq_length", "48", "--data.cache_dir", str(cache),
        "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--train.max_steps", str(STEPS),
        "--train.epochs", "8", "--train.warmup_steps", "2", "--train.lr", "5e-3", "--accelerator", "cpu", "--precision", "32-true", *extra,
    ]


def losses(out_dir: Path) -> dict[int, float]:
    with open(out_dir / "metrics.csv") as file:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")}


# Each case: the allocation SLURM reports, the flags that contradict it, and what the error asks for instead.
MISMATCHES = {
    "devices": ({"tasks": 1}, ["--devices", "2"], "pass --devices 1 --num_nodes 1"),
    "num_nodes": ({"tasks": 2, "nodes": 2}, ["--devices", "1"], "pass --devices 1 --num_nodes 2"),
}


@pytest.fixture(scope="module")
def mismatched_runs(tiny_llama_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every case of MISMATCHES run as its own `litft finetune` process, each in its own folder, the two at once (a
    process spends its ~10 s importing on one core; the CI machine has two)."""
    runs = []
    for case, (allocation, flags, _) in MISMATCHES.items():
        tmp_path = tmp_path_factory.mktemp(case)
        args = finetune_args(tiny_llama_dir, tmp_path / "out", tmp_path / "cache", *flags)
        runs.append(partial(subprocess.run, args, env=slurm_env(tmp_path, **allocation), capture_output=True,
                            text=True, check=False, timeout=120))
    return dict(zip(MISMATCHES, concurrently(*runs)))


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_allocation_mismatch_is_one_clear_error(mismatched_runs, case):
    expected = MISMATCHES[case][2]
    result = mismatched_runs[case]
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("litft: error: --devices"), result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr


def test_sigusr1_checkpoints_requeues_and_the_requeued_job_continues(tiny_llama_dir, tmp_path):
    cache, out_dir = tmp_path / "cache", tmp_path / "preempted"
    reference_dir = tmp_path / "reference"
    # The uninterrupted reference run goes on beside the preempted job and its requeued run (each process is seeded
    # and single-threaded: running beside another changes only its speed); the curves are compared at the end.
    pool = ThreadPoolExecutor(max_workers=1)
    reference_run = pool.submit(
        subprocess.run, finetune_args(tiny_llama_dir, reference_dir, cache), check=True, capture_output=True,
        timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    pool.shutdown(wait=False)

    job = subprocess.Popen(
        finetune_args(tiny_llama_dir, out_dir, cache), env=slurm_env(tmp_path), stderr=subprocess.PIPE, text=True
    )
    stderr_lines: list[str] = []
    training_started = threading.Event()

    def read_stderr() -> None:
        for line in job.stderr:
            stderr_lines.append(line)
            if line.startswith("training:"):
                training_started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert training_started.wait(timeout=120), "".join(stderr_lines)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=120) == 0, "".join(stderr_lines)
    reader.join(timeout=10)

    saved = sorted((out_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.pt").is_file()
    stopped_at = int(saved[0].name.removeprefix("step-"))
    assert 0 < stopped_at < STEPS, "the signal arrived after training ended; the test needs more steps"
    assert (tmp_path / "scontrol_calls.txt").read_text().split() == ["requeue", JOB_ID]
    assert not (out_dir / "final").exists()
    assert not list((out_dir / "checkpoints").glob(".*")), "a temporary checkpoint folder was left behind"

    requeued = subprocess.run(
        finetune_args(tiny_llama_dir, out_dir, cache), env=slurm_env(tmp_path, restart_count=1),
        capture_output=True, text=True, check=False, timeout=240,
    )
    assert requeued.returncode == 0, requeued.stderr[-4000:]
    assert f"resumed from {saved[0]} at step {stopped_at}" in requeued.stderr
    reference_run.result()
    reference, resumed = losses(reference_dir), losses(out_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])
    assert (out_dir / "final" / "adapter_model.safetensors").is_file()


# ---- litft slurm ---------------------------------------------------------------------------------------------


def sbatch_lines(script: str) -> dict[str, str]:
    options = [line.removeprefix("#SBATCH --").partition("=") for line in script.splitlines() if line.startswith("#SBATCH")]
    return {name: value for name, _, value in options}


def test_slurm_writes_a_script_for_several_nodes(tmp_path):
    out = tmp_path / "job.sbatch"
    slurm(command="finetune lora --checkpoint ckpt --data.path d.jsonl --strategy fsdp", nodes=2, gpus_per_node=4,
          partition="gpu", out=out)
    script = out.read_text()
    options = sbatch_lines(script)
    assert options["nodes"] == "2" and options["ntasks-per-node"] == "4" and options["gpus-per-node"] == "4"
    assert options["signal"] == "USR1@120" and "requeue" in options and options["partition"] == "gpu"
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    words = shlex.split(srun[0])
    assert words[words.index("litft"):] == [
        "litft", "finetune", "lora", "--checkpoint", "ckpt", "--data.path", "d.jsonl", "--strategy", "fsdp",
        "--devices", "4", "--num_nodes", "2",
    ]
    assert "NCCL_SOCKET_IFNAME" in script  # the multi-node network hint
    result = subprocess.run(["bash", "-n", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flag", ["nodes", "gpus_per_node", "cpus_per_gpu"])
def test_slurm_names_the_allocation_flag_that_is_below_one(tmp_path, flag):
    from litft.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^--{flag} 0: must be at least 1$"):
        slurm(command="finetune lora --checkpoint ckpt --data.path d.jsonl", out=tmp_path / "job.sbatch",
              **{flag: 0})
    assert not (tmp_path / "job.sbatch").exists()


def test_slurm_command_after_double_dash_and_submit(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "sbatch_args.txt"}\necho "Submitted batch job 7"\n')
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "job.sbatch"
    argv = slurm_passthrough(["slurm", "--nodes", "1", "--gpus_per_node", "2", "--submit", "true", "--out", str(out),
                              "--", "finetune", "qlora", "--checkpoint", "my model", "--devices", "2"])
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "litft", *argv], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Submitted batch job 7" in result.stdout
    assert (tmp_path / "sbatch_args.txt").read_text().split() == [str(out)]
    srun = next(line for line in out.read_text().splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[-8:] == ["finetune", "qlora", "--checkpoint", "my model", "--devices", "2", "--num_nodes", "1"]


def test_slurm_refuses_a_command_that_contradicts_the_allocation(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "litft", "slurm", "--gpus_per_node", "8", "--out", str(tmp_path / "job.sbatch"),
         "--command", "finetune lora --devices 4"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            "litft: error: the command sets --devices 4 but the allocation has --gpus_per_node 8; drop --devices "
            "from the command or make them equal"
        )
    ]
    assert not (tmp_path / "job.sbatch").exists()


@pytest.mark.parametrize("name", ["one_node", "multi_node"])
def test_recipes_are_what_litft_slurm_writes(tmp_path, name):
    """The recipes in recipes/slurm/ are generated; they stay in step with the generator."""
    recipe = (ROOT / "recipes" / "slurm" / f"{name}.sbatch").read_text()
    options = sbatch_lines(recipe)
    srun = next(line for line in recipe.splitlines() if line.startswith("srun "))
    command = shlex.split(srun)[shlex.split(srun).index("litft") + 1 :]
    out = tmp_path / "regenerated.sbatch"
    setup = next(line for line in recipe.splitlines() if line.startswith("source "))
    slurm(command=shlex.join(command), nodes=int(options["nodes"]), gpus_per_node=int(options["gpus-per-node"]),
          cpus_per_gpu=int(options["cpus-per-task"]), time=options["time"], job_name=options["job-name"],
          setup=setup, out=out)
    assert out.read_text() == recipe
