"""`litft slurm`: writes (and optionally submits) the sbatch script that runs a litft command on a SLURM cluster.

One SLURM task per GPU: `srun` starts `--ntasks-per-node` copies of the command on every node, and Lightning
Fabric reads each task's rank from SLURM's variables (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID,
SLURM_JOB_NODELIST), so nothing else launches processes. The script also asks for SIGUSR1 shortly before the time
limit: litft then saves a checkpoint, requeues the job, and the requeued job resumes from it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from litft.errors import ConfigError

PASSTHROUGH = "--"


def slurm_passthrough(argv: list[str]) -> list[str]:
    """`slurm [options] -- COMMAND...` -> `slurm [options] --command "COMMAND..."`: the CLI parser cannot take
    another program's flags as they are, so everything after `--` becomes one quoted string."""
    if not argv or argv[0] != "slurm" or PASSTHROUGH not in argv:
        return argv
    split = argv.index(PASSTHROUGH)
    return [*argv[:split], "--command", shlex.join(argv[split + 1 :])]


def _flag_value(words: list[str], flag: str) -> str | None:
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def training_command(command: str, nodes: int, gpus_per_node: int) -> list[str]:
    """The litft command line for every task, with `--devices` and `--num_nodes` set to the allocation (a
    different value given in the command is an error, not something to find out after the queue)."""
    words = shlex.split(command)
    if not words:
        raise ConfigError('--command is empty: pass the litft command to run, e.g. `litft slurm -- finetune lora ...`')
    if words[0] == "litft":
        words = words[1:]
    for flag, expected in (("--devices", gpus_per_node), ("--num_nodes", nodes)):
        given = _flag_value(words, flag)
        if given is None:
            words += [flag, str(expected)]
        elif given != str(expected):
            option = "--gpus_per_node" if flag == "--devices" else "--nodes"
            raise ConfigError(
                f"the command sets {flag} {given} but the allocation has {option} {expected}; drop {flag} from the "
                f"command or make them equal"
            )
    return ["litft", *words]


def sbatch_script(
    command: list[str],
    nodes: int,
    gpus_per_node: int,
    cpus_per_gpu: int,
    time: str,
    job_name: str,
    partition: str | None,
    account: str | None,
    signal_seconds: int,
    setup: str | None,
) -> str:
    optional = "".join(
        f"#SBATCH --{name}={value}\n" for name, value in (("partition", partition), ("account", account)) if value
    )
    multi_node = nodes > 1
    network = (
        "# Several nodes talk over the network. If NCCL picks the wrong interface or hangs at start, name the\n"
        "# interface (see `ip addr`) and the InfiniBand adapters of your cluster:\n"
        "# export NCCL_SOCKET_IFNAME=ib0\n"
        "# export NCCL_IB_HCA=mlx5\n"
        if multi_node
        else "# One node: NCCL uses NVLink / PCIe between the GPUs, nothing to configure.\n"
    )
    setup_line = setup if setup else "# source .venv/bin/activate   # the environment litft is installed in"
    return f"""#!/bin/bash
# Written by `litft slurm`: {nodes} node(s) x {gpus_per_node} GPU(s), one SLURM task (= one training process) per GPU.
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
# One task per GPU: Lightning Fabric reads each task's rank from SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID;
# --devices and --num_nodes on the litft command below must match these two lines (litft checks at start).
#SBATCH --ntasks-per-node={gpus_per_node}
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_gpu}
#SBATCH --time={time}
# SIGUSR1 {signal_seconds} s before the time limit (and SIGTERM on preemption): litft saves a checkpoint, runs
# `scontrol requeue $SLURM_JOB_ID` and exits; the requeued job (SLURM_RESTART_COUNT > 0) resumes from it.
#SBATCH --signal=USR1@{signal_seconds}
#SBATCH --requeue
# The requeued job appends to the same log file.
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
{optional}
set -euo pipefail
{setup_line}

# NCCL: report failures as errors (not hangs) and print a short summary of what it set up.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=WARN
{network}# Each task gets its share of the CPU cores for data loading and tokenization.
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

# srun starts --ntasks-per-node copies of the command on every node; --kill-on-bad-exit stops all of them if one fails.
srun --kill-on-bad-exit=1 {shlex.join(command)}
"""


def slurm(
    command: str = "",
    nodes: int = 1,
    gpus_per_node: int = 8,
    cpus_per_gpu: int = 8,
    time: str = "24:00:00",
    job_name: str = "litft",
    partition: str | None = None,
    account: str | None = None,
    signal_seconds: int = 120,
    setup: str | None = None,
    out: Path = Path("litft.sbatch"),
    submit: bool = False,
) -> None:
    """Write an sbatch script that runs a litft command on NODES x GPUS_PER_NODE GPUs; optionally submit it.

    Usage: litft slurm --nodes 2 --gpus_per_node 8 [--submit true] -- finetune lora --checkpoint ... --strategy fsdp

    Args:
        command: The litft command to run (everything after `--`), e.g. "finetune lora --checkpoint ...".
            --devices and --num_nodes are added to match the allocation.
        nodes: Nodes to allocate.
        gpus_per_node: GPUs per node; one task is started per GPU.
        cpus_per_gpu: CPU cores per task.
        time: The job's time limit (HH:MM:SS or D-HH:MM:SS).
        job_name: The SLURM job name (also names the log file).
        partition: The SLURM partition (default: the cluster's).
        account: The SLURM account to charge (default: yours).
        signal_seconds: Seconds before the time limit at which litft is told to checkpoint and requeue.
        setup: A shell line that activates the environment litft is installed in, e.g. "source .venv/bin/activate".
        out: Where to write the script.
        submit: Run `sbatch` on the script.
    """
    for flag, value in (("--nodes", nodes), ("--gpus_per_node", gpus_per_node), ("--cpus_per_gpu", cpus_per_gpu)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if signal_seconds < 10:
        raise ConfigError(f"--signal_seconds {signal_seconds}: allow at least 10 s to save a checkpoint")
    script = sbatch_script(
        training_command(command, nodes, gpus_per_node), nodes, gpus_per_node, cpus_per_gpu, time, job_name,
        partition, account, signal_seconds, setup,
    )
    from litft.checkpoint import atomic_write_text

    atomic_write_text(out, script)
    print(f"wrote {out}")
    if not submit:
        print(f"submit it with: sbatch {out}")
        return
    try:
        result = subprocess.run(["sbatch", str(out)], capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError:
        raise ConfigError("--submit: `sbatch` is not on PATH; run this on a SLURM login node") from None
    if result.returncode != 0:
        raise ConfigError(f"sbatch {out} failed: {result.stderr.strip() or result.returncode}")
    print(result.stdout.strip())
