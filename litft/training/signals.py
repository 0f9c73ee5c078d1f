"""Preemption: stop at the next optimizer step with a checkpoint saved, requeue the SLURM job, resume on restart.

SLURM sends SIGTERM when a job is preempted or reaches its time limit (then SIGKILL after `KillWait`), and the
signal of `#SBATCH --signal=USR1@120` that long before the limit. Either signal only raises a flag; the training
loop asks `PreemptionSignal()` after every step, the ranks agree (a signal may reach one rank before the others),
and `fit` saves its checkpoint and returns. The recipe then asks SLURM to requeue the job; the requeued job
(`SLURM_RESTART_COUNT` > 0) resumes from the newest checkpoint as if `--resume auto` had been passed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import torch
from lightning.fabric import Fabric

from litft.errors import LitftError

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def under_slurm_batch_job() -> bool:
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def resume_after_requeue(resume: str | None) -> str | None:
    """`--resume`, or "auto" for a SLURM job that was requeued (it restarts with the same command line)."""
    if resume is None and under_slurm_batch_job() and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        print(
            f"resume: SLURM job {os.environ['SLURM_JOB_ID']} restart {os.environ['SLURM_RESTART_COUNT']}, resuming "
            "from the latest checkpoint", file=sys.stderr, flush=True,
        )
        return "auto"
    return resume


class PreemptionSignal:
    """Catches SIGUSR1 and SIGTERM; calling the object answers "should training stop now?" for all ranks."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.name: str | None = None  # the signal received, if any
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for signum in PREEMPTION_SIGNALS:
                signal.signal(signum, self._record)

    def _record(self, signum: int, _frame) -> None:
        self.name = signal.Signals(signum).name

    def __call__(self) -> bool:
        if self.fabric.world_size == 1:  # nothing to agree on: no collective, no device sync in the step
            return self.name is not None
        received = torch.tensor(0.0 if self.name is None else 1.0, device=self.fabric.device)
        stop = bool(self.fabric.all_reduce(received, reduce_op="sum").item() > 0)
        if stop and self.name is None:
            self.name = "a signal on another rank"
        return stop

    def requeue(self) -> None:
        """Under SLURM, rank 0 puts the job back in the queue (after the checkpoint is on disk)."""
        if not under_slurm_batch_job() or not self.fabric.is_global_zero:
            return
        job_id = os.environ["SLURM_JOB_ID"]
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise LitftError(f"could not requeue SLURM job {job_id} ({error}); the checkpoint is saved, resubmit with --resume auto") from None
        if result.returncode != 0:
            raise LitftError(
                f"`scontrol requeue {job_id}` failed ({result.stderr.strip() or result.returncode}); the checkpoint is "
                "saved, resubmit the job with --resume auto"
            )
        print(f"requeued SLURM job {job_id}", file=sys.stderr, flush=True)
