"""`litft finetune lora | qlora | full`: the supervised fine-tuning recipes, and the one recipe body that every
fine-tuning command runs (the preference recipes of `litft.commands.preference` too).

The body reads in the order it runs: setup, data, model, optimizer, loop, save. The methods differ only in how the
model is prepared (LoRA adapters, a 4-bit base, or every weight trained) and in what is saved (a PEFT adapter, or a
full Hugging Face checkpoint). What the model learns from and how it is scored is a `TrainingTask`: supervised rows
and next-token loss here, preference pairs and DPO / ORPO / SimPO in `litft.commands.preference`."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from litft.adapters.lora import LoRAConfig
from litft.data import DataConfig
from litft.errors import ConfigError
from litft.models import flash_attention
from litft.models.common import use_flex_attention
from litft.training.config import EvalConfig, TrainConfig

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from litft.chat_templates import ChatTemplate
    from litft.tokenizer import Tokenizer
    from litft.training.loop import Objective

LOGGERS = ("csv", "tensorboard", "wandb", "none")
METHODS = ("lora", "qlora", "full")


def lora(
    checkpoint: Path | None = None,
    out_dir: Path = Path("out/finetune/lora"),
    data: DataConfig = DataConfig(),
    lora: LoRAConfig = LoRAConfig(),
    train: TrainConfig = TrainConfig(),
    eval: EvalConfig = EvalConfig(),
    precision: str | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    fsdp_cpu_offload: bool = False,
    logger: str = "csv",
    seed: int = 42,
    resume: str | None = None,
    overwrite: bool = False,
    compile: bool = False,
    compiler: str = "torch",
    dry_run: bool = False,
) -> None:
    """Fine-tune LoRA adapters on a frozen base model; writes a PEFT-format adapter to OUT_DIR/final.

    Args:
        checkpoint: A Hugging Face model folder (see `litft download`).
        out_dir: Where checkpoints, metrics and the final adapter go.
        data: The dataset (see `litft data preview`).
        lora: The adapters.
        train: Batch sizes, schedule, optimizer.
        eval: Validation.
        precision: bf16-true, bf16-mixed, 16-mixed, 16-true or 32-true (default: bf16-true on a GPU, 32-true on CPU).
        accelerator: auto, cuda or cpu.
        devices: Devices per node.
        num_nodes: Nodes (under SLURM, from the allocation).
        strategy: auto (DDP if the model and its optimizer state fit on one device, else FSDP2), single, ddp or
            fsdp (FSDP2: weights, gradients and optimizer state sharded over the devices).
        fsdp_cpu_offload: With --strategy fsdp, keep the sharded weights, gradients and optimizer state in host memory.
        logger: csv, tensorboard, wandb or none.
        seed: Seed for data order, adapter initialisation and dropout.
        resume: "auto" (the latest checkpoint in out_dir) or a checkpoint folder to continue from. A requeued
            SLURM job resumes automatically.
        overwrite: Replace the results of an earlier run in out_dir.
        compile: Compile each decoder block, with --compiler.
        compiler: torch (torch.compile) or thunder (lightning-thunder's thunder.jit, which implies --compile;
            not with qlora, nor with activation checkpointing and --lora.dropout above 0).
        dry_run: Print the estimated peak memory and tokens/s per device, then stop without training.
    """
    run_finetune("lora", **locals())


def qlora(
    checkpoint: Path | None = None,
    out_dir: Path = Path("out/finetune/qlora"),
    data: DataConfig = DataConfig(),
    lora: LoRAConfig = LoRAConfig(),
    train: TrainConfig = TrainConfig(),
    eval: EvalConfig = EvalConfig(),
    quantize: str = "bnb.nf4",
    precision: str | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    fsdp_cpu_offload: bool = False,
    logger: str = "csv",
    seed: int = 42,
    resume: str | None = None,
    overwrite: bool = False,
    compile: bool = False,
    compiler: str = "torch",
    dry_run: bool = False,
) -> None:
    """Fine-tune LoRA adapters on a base model stored in 4-bit (or 8-bit); writes a PEFT-format adapter.

    Args:
        checkpoint: A Hugging Face model folder (see `litft download`).
        out_dir: Where checkpoints, metrics and the final adapter go.
        data: The dataset (see `litft data preview`).
        lora: The adapters.
        train: Batch sizes, schedule, optimizer.
        eval: Validation.
        quantize: bnb.nf4, bnb.fp4 or bnb.int8: how the frozen base weights are stored. fp8: the base's matrix
            multiplies run in 8-bit float, about twice bf16's rate on GPUs of compute capability 8.9+ (Ada,
            Hopper); for speed, not memory (two bytes per weight), at ~4% error per multiply.
        precision: Compute precision (default: bf16-true on a GPU, 32-true on CPU).
        accelerator: auto, cuda or cpu.
        devices: Devices per node.
        num_nodes: Nodes.
        strategy: auto (DDP if the model and its optimizer state fit on one device, else FSDP2), single, ddp or
            fsdp (FSDP2: weights, gradients and optimizer state sharded over the devices).
        fsdp_cpu_offload: With --strategy fsdp, keep the sharded weights, gradients and optimizer state in host memory.
        logger: csv, tensorboard, wandb or none.
        seed: Seed for data order, adapter initialisation and dropout.
        resume: "auto" or a checkpoint folder to continue from. A requeued SLURM job resumes automatically.
        overwrite: Replace the results of an earlier run in out_dir.
        compile: Compile each decoder block, with --compiler.
        compiler: torch (torch.compile). thunder (lightning-thunder's thunder.jit) cannot compile a quantized base.
        dry_run: Print the estimated peak memory and tokens/s per device, then stop without training.
    """
    run_finetune("qlora", **locals())


def full(
    checkpoint: Path | None = None,
    out_dir: Path = Path("out/finetune/full"),
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(lr=2e-5),
    eval: EvalConfig = EvalConfig(),
    precision: str | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    fsdp_cpu_offload: bool = False,
    logger: str = "csv",
    seed: int = 42,
    resume: str | None = None,
    overwrite: bool = False,
    compile: bool = False,
    compiler: str = "torch",
    dry_run: bool = False,
) -> None:
    """Fine-tune every weight of the model; writes a Hugging Face checkpoint folder to OUT_DIR/final.

    Args:
        checkpoint: A Hugging Face model folder (see `litft download`).
        out_dir: Where checkpoints, metrics and the final model go.
        data: The dataset (see `litft data preview`).
        train: Batch sizes, schedule, optimizer.
        eval: Validation.
        precision: bf16-true, bf16-mixed, 16-mixed, 16-true or 32-true (default: bf16-true on a GPU, 32-true on CPU).
        accelerator: auto, cuda or cpu.
        devices: Devices per node.
        num_nodes: Nodes.
        strategy: auto (DDP if the model and its optimizer state fit on one device, else FSDP2), single, ddp or
            fsdp (FSDP2: weights, gradients and optimizer state sharded over the devices).
        fsdp_cpu_offload: With --strategy fsdp, keep the sharded weights, gradients and optimizer state in host memory.
        logger: csv, tensorboard, wandb or none.
        seed: Seed for data order and dropout.
        resume: "auto" or a checkpoint folder to continue from. A requeued SLURM job resumes automatically.
        overwrite: Replace the results of an earlier run in out_dir.
        compile: Compile each decoder block, with --compiler.
        compiler: torch (torch.compile) or thunder (lightning-thunder's thunder.jit, which implies --compile;
            not with qlora, nor with activation checkpointing and --lora.dropout above 0).
        dry_run: Print the estimated peak memory and tokens/s per device, then stop without training.
    """
    run_finetune("full", **locals())


@dataclass
class FinetuneRun:
    """Everything a run was started with, as saved beside its outputs (`litft_run.json`)."""

    method: str
    checkpoint: str
    out_dir: str
    data: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    lora: dict[str, Any] | None = None
    quantize: str | None = None
    precision: str | None = None
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 42
    extra: dict[str, Any] = field(default_factory=dict)


# A key names a secret when one of its words is one of these, or when its last word is "token" and it does not name
# a special token (pad_token, eos_token, ...). Matching "token" anywhere dropped max_new_tokens and mlp_tile_tokens
# from every saved run configuration.
SECRET_WORDS = frozenset({"secret", "password", "passwd", "credential", "credentials", "apikey"})
SPECIAL_TOKEN_ROLES = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "stop", "start", "end"})
# A value that is a Hugging Face access token, whatever its key is called.
HF_TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{30,}")


def is_secret_key(key: Any) -> bool:
    words = [word for word in re.split(r"[^a-z0-9]+", str(key).lower()) if word]
    if not words:
        return False
    if SECRET_WORDS.intersection(words) or "api_key" in "_".join(words):
        return True
    return words[-1] == "token" and not (len(words) == 2 and words[0] in SPECIAL_TOKEN_ROLES)


def without_secrets(value: Any) -> Any:
    """Drops every entry whose key names a secret (`is_secret_key`), at any depth, and every value that is a Hugging
    Face token, before a configuration is written to disk."""
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if not is_secret_key(k) and not _is_hf_token(v)}
    if isinstance(value, list):
        return [without_secrets(v) for v in value if not _is_hf_token(v)]
    return value


def _is_hf_token(value: Any) -> bool:
    return isinstance(value, str) and HF_TOKEN_VALUE.fullmatch(value.strip()) is not None


def prepare_out_dir(out_dir: Path, resume: str | None, overwrite: bool) -> tuple[Path | None, bool]:
    """Refuses to write into a previous run's folder unless resuming or overwriting; returns the checkpoint to
    resume from, if any, and whether a previous run is to be replaced (by `clear_previous_run`, once the data and
    the model have loaded: a mistake found there must not cost the previous run)."""
    from litft.training.loop import CHECKPOINT_METADATA, checkpoint_folder, is_checkpoint, latest_checkpoint

    if resume is not None:
        if resume == "auto":
            return latest_checkpoint(out_dir), False
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(
                f"--resume {resume}: no such folder; pass auto or a folder from {checkpoint_folder(out_dir)}"
            )
        if not is_checkpoint(path):
            raise ConfigError(
                f"--resume {resume}: no {CHECKPOINT_METADATA} in that folder; pass a folder from {checkpoint_folder(out_dir)}"
            )
        return path, False
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            if any((out_dir / name).exists() for name in ("final", "metrics.csv", checkpoint_folder(out_dir).name)):
                raise ConfigError(f"--out_dir {out_dir} already holds a run; pass --resume auto to continue it or "
                                  "--overwrite true to replace it")
            raise ConfigError(f"--out_dir {out_dir} is not empty and holds no run; choose an empty or new folder, or "
                              "pass --overwrite true to write the run beside what is there")
        return None, True
    return None, False


def longest_sequence(rows: list[Any]) -> int:
    """The most tokens of one sample among the rows: a supervised row is a list of samples (a packed row's each
    restart at position 0), a preference row a {"chosen", "rejected"} pair of them."""
    samples = (sample for row in rows for sample in (row if isinstance(row, list) else row.values()))
    return max((len(sample["input_ids"]) for sample in samples), default=0)


def warn_past_context(rows: list[Any], hf_config: dict, log: Callable[[str], None]) -> None:
    """A note when samples run past the positions the model was trained for: training there works (RoPE has no
    table to run off) but the model has never seen such positions, which a user coming from a 4k-context model may
    not mean to do."""
    positions = hf_config.get("max_position_embeddings")
    longest = longest_sequence(rows)
    if isinstance(positions, int) and longest > positions:
        log(f"warning: the longest sample has {longest} tokens, past the {positions} positions of the checkpoint's "
            f"max_position_embeddings; lower --data.max_seq_length to {positions} to stay within them")


def refuse_out_dir_over_checkpoint(out_dir: Path, checkpoint: Path) -> None:
    """A run writes OUT_DIR/final and OUT_DIR/checkpoints and replaces them with --overwrite: neither may hold the
    base checkpoint (continuing from a previous run's final/ into the same --out_dir would replace the model being
    trained), and the checkpoint's own folder is not a run folder."""
    from litft.checkpoint import is_or_holds
    from litft.training.loop import checkpoint_folder

    for owned in (out_dir / "final", checkpoint_folder(out_dir)):
        if is_or_holds(owned, checkpoint):
            raise ConfigError(f"--out_dir {out_dir}: its {owned.name}/ holds --checkpoint {checkpoint}, which the run "
                              "would replace; choose another --out_dir")
    if checkpoint.resolve() == out_dir.resolve():
        raise ConfigError(f"--out_dir {out_dir}: is the --checkpoint folder; choose another --out_dir")


def clear_previous_run(out_dir: Path) -> None:
    """Removes what an earlier run wrote into `out_dir` (--overwrite true): its checkpoints and logs. Its `final/`
    stays until this run's own replaces it, in one rename."""
    from litft.training.loop import checkpoint_folder

    shutil.rmtree(checkpoint_folder(out_dir), ignore_errors=True)
    for name in ("metrics.csv", "loss.png", "hparams.yaml"):
        (out_dir / name).unlink(missing_ok=True)


def read_metrics(out_dir: Path, up_to_step: int) -> list[dict[str, str]]:
    """The rows of an earlier run's metrics.csv up to `up_to_step` (Fabric's CSV logger replaces the file when a
    resumed run logs, so they are put back afterwards by `prepend_metrics`)."""
    path = out_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("step") and int(row["step"]) <= up_to_step]


def prepend_metrics(out_dir: Path, earlier: list[dict[str, str]]) -> None:
    from litft.checkpoint import atomic_write_text

    path = out_dir / "metrics.csv"
    later = []
    if path.is_file():
        with path.open(newline="") as file:
            later = list(csv.DictReader(file))
    rows = earlier + later
    fieldnames = sorted({name for row in rows for name in row}, key=lambda name: (name != "step", name))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def make_loggers(kind: str, out_dir: Path) -> list:
    if kind not in LOGGERS:
        raise ConfigError(f"--logger {kind!r}: choose one of {', '.join(LOGGERS)}")
    if kind == "none":
        return []
    if kind == "csv":
        from lightning.fabric.loggers import CSVLogger

        return [CSVLogger(root_dir=str(out_dir), name="", version="")]
    if kind == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        return [TensorBoardLogger(root_dir=str(out_dir), name="tensorboard", version="")]
    from lightning.pytorch.loggers import WandbLogger

    return [WandbLogger(save_dir=str(out_dir), project="litft", offline=os.environ.get("WANDB_MODE") == "offline")]


class TrainingTask(Protocol):
    """What a recipe learns from and how the model is scored: supervised rows (`SupervisedTask`) or preference
    pairs (`litft.commands.preference.PreferenceTask`). `run_finetune` does everything else the same way for both."""

    name: str  # the objective, in the log and in litft_run.json
    data_path_help: str  # what --data.path must hold, for the error when it is missing

    def validate(self, data: DataConfig) -> None:
        """Refuses flags this task cannot use, before anything is loaded."""

    def keeps_frozen_copy(self, method: str) -> bool:
        """Whether the objective holds a frozen copy of the starting model (weighed by `--strategy auto`)."""

    def load_rows(
        self, data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seed: int, log: Callable[[str], None]
    ) -> tuple[list[Any], list[Any] | None]:
        """The training and validation rows the objective collates."""

    def make_objective(self, fabric: Fabric, model: nn.Module, tokenizer: Tokenizer, method: str) -> Objective:
        """The loop's objective, made from the model as loaded: before activation checkpointing and compilation
        change its forward, and before Fabric wraps it."""

    def run_config(self) -> dict[str, Any]:
        """The task's own settings, saved in litft_run.json (`FinetuneRun.extra`)."""

    def plot(self, out_dir: Path) -> None:
        """Any plot beside loss.png, drawn at the end of a finished run."""


class SupervisedTask:
    """Supervised fine-tuning: rows of (packed or padded) samples, next-token cross-entropy on the trained tokens."""

    name = "sft"
    data_path_help = "a .json/.jsonl/.parquet file or a folder of them"

    def validate(self, data: DataConfig) -> None:
        pass

    def keeps_frozen_copy(self, method: str) -> bool:
        return False

    def load_rows(
        self, data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seed: int, log: Callable[[str], None]
    ) -> tuple[list[Any], list[Any] | None]:
        from litft.data import load_datasets, make_rows

        train_samples, val_samples = load_datasets(data, tokenizer, template, log=log)
        train_rows = make_rows(train_samples, data.max_seq_length, data.pack, seed)
        return train_rows, make_rows(val_samples, data.max_seq_length, data.pack, seed) if val_samples else None

    def make_objective(self, fabric: Fabric, model: nn.Module, tokenizer: Tokenizer, method: str) -> Objective:
        from litft.training.objectives import SupervisedObjective

        return SupervisedObjective(pad_id=padding_id(tokenizer))

    def run_config(self) -> dict[str, Any]:
        return {}

    def plot(self, out_dir: Path) -> None:
        pass


SUPERVISED = SupervisedTask()


def run_finetune(
    method: str,
    checkpoint: Path | None,
    out_dir: Path,
    data: DataConfig,
    train: TrainConfig,
    eval: EvalConfig,
    precision: str | None,
    accelerator: str,
    devices: int | str,
    num_nodes: int,
    strategy: str,
    logger: str,
    seed: int,
    resume: str | None,
    overwrite: bool,
    compile: bool,
    compiler: str = "torch",
    lora: LoRAConfig | None = None,
    quantize: str | None = None,
    fsdp_cpu_offload: bool = False,
    task: TrainingTask = SUPERVISED,
    dry_run: bool = False,
) -> Path:
    """The recipe body of every `litft finetune` command: trains `method`'s parameters on `task`, and writes the
    adapter or checkpoint to OUT_DIR/final."""
    from lightning.fabric.utilities.seed import seed_everything

    from litft.chat_templates import resolve_chat_template
    from litft.checkpoint import checkpoint_dir_or_error, read_hf_config
    from litft.tokenizer import Tokenizer
    from litft.training.compilation import compile_blocks, has_mixture_of_experts, resolve_compiler
    from litft.training.loop import Progress, TrainingState, fit, plot_history, total_steps
    from litft.training.loss import CausalLMObjective
    from litft.training.optim import make_optimizer, make_scheduler
    from litft.training.signals import PreemptionSignal, resume_after_requeue
    from litft.training.strategies import is_fsdp, log, make_fabric, resolve_precision

    # ---- setup -------------------------------------------------------------------------------------------------
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if checkpoint is None:
        raise ConfigError("--checkpoint is required: a Hugging Face model folder (see `litft download`)")
    if data.path is None:
        raise ConfigError(f"--data.path is required: {task.data_path_help}")
    task.validate(data)
    train.validate()
    eval.validate()
    if train.router_aux_loss_coef and not isinstance(task, SupervisedTask):
        raise ConfigError(f"--train.router_aux_loss_coef applies to supervised fine-tuning, not to {task.name}; "
                          "leave it at 0")
    checkpoint = checkpoint_dir_or_error(checkpoint)
    out_dir = Path(out_dir)
    refuse_out_dir_over_checkpoint(out_dir, checkpoint)
    # The preference recipes take --lora and --quantize whatever the method; only the methods that use them see them.
    lora = lora if method != "full" else None
    quantize = quantize if method == "qlora" else None
    resume = resume_after_requeue(resume)
    compiler = resolve_compiler(compile, compiler, quantize)  # None: eager
    precision_name, weights_dtype, fabric_precision = resolve_precision(precision, accelerator)
    memory = None
    if strategy == "auto" or dry_run or train.micro_batch_size == "auto":
        memory = model_memory(method, checkpoint, weights_dtype, lora, quantize)
        if task.keeps_frozen_copy(method):  # the frozen copy weighs as much as the trained weights
            memory = replace(memory, weight_bytes=memory.weight_bytes + memory.trained_bytes)
    auto_micro_batch = train.micro_batch_size == "auto"  # on a GPU the estimate's pick is probed once set up
    if dry_run or auto_micro_batch:
        # Either compiler keeps what a compiled block keeps: thunder, with its torch.compile fusion executor, peaked at
        # 18.39 GiB where torch.compile peaked at 16.97 and the eager model says ~28 (LoRA llama-1b 8 x 2048, H200).
        compiled = compiler is not None
        train = fit_micro_batch(
            train, memory, method, checkpoint, weights_dtype, data, accelerator, devices, num_nodes, compiled
        )
        if dry_run:
            return out_dir / "final"
    fabric = make_fabric(
        accelerator, devices, num_nodes, strategy, fabric_precision, make_loggers(logger, out_dir), memory,
        fsdp_cpu_offload,
    )
    fabric.launch()
    flash_attention.check_setting(fabric.device)  # a bad LITFT_FLASH_ATTENTION_4 stops here, before anything loads
    preemption = PreemptionSignal(fabric)  # from here on SIGUSR1 / SIGTERM save a checkpoint and stop
    resume_from, replacing_previous_run = prepare_out_dir(out_dir, resume, overwrite)
    seed_everything(seed, verbose=False)
    log_rank_zero = (lambda message: log(message)) if fabric.is_global_zero else (lambda message: None)

    # ---- data --------------------------------------------------------------------------------------------------
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    template = resolve_chat_template(tokenizer, data.template, flag="--data.template")
    with fabric.rank_zero_first():  # rank 0 tokenizes and fills the cache; the others read it
        train_rows, val_rows = task.load_rows(data, tokenizer, template, seed, log_rank_zero)
    warn_past_context(train_rows, read_hf_config(checkpoint), log_rank_zero)

    # ---- model -------------------------------------------------------------------------------------------------
    sharded = is_fsdp(fabric)
    model = load_for_strategy(fabric, method, checkpoint, weights_dtype, lora, quantize)
    if train.router_aux_loss_coef and not has_mixture_of_experts(model):
        raise ConfigError(f"--train.router_aux_loss_coef {train.router_aux_loss_coef}: {checkpoint} has no mixture "
                          "of experts (no router to balance); leave it at 0")
    objective = task.make_objective(fabric, model, tokenizer, method)
    if train.router_aux_loss_coef:  # the balancing loss counts real tokens only: batches carry their mask
        objective.token_mask = True
    if train.mlp_tile_tokens is not None:
        from litft.training.tiling import enable_tiled_mlp

        enable_tiled_mlp(model, train.mlp_tile_tokens)
    if train.activation_checkpointing:
        from litft.training.strategies import enable_activation_checkpointing

        enable_activation_checkpointing(
            model, offload=train.activation_checkpointing == "offload", blocks=train.checkpointed_blocks
        )
    if compiler is not None:
        compile_blocks(model, compiler)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from litft.adapters.quantization import logical_parameter_count

    total = logical_parameter_count(model)
    # Read after compiling: thunder switches FlashAttention-4 off.
    attention = attention_description(model.config, fabric.device)
    log_rank_zero(f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trained, "
                  f"precision {precision_name}, template {template.name}, objective {task.name}, "
                  f"attention {attention}")
    wrapped = setup_for_strategy(fabric, CausalLMObjective(model, router_aux_loss_coef=train.router_aux_loss_coef))

    # ---- optimizer ---------------------------------------------------------------------------------------------
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, train))
    scheduler = make_scheduler(optimizer, total_steps(train, len(train_rows)), train)
    progress = Progress()
    state = TrainingState(fabric, wrapped, optimizer, scheduler, progress, full_weights=method == "full")
    earlier_metrics: list[dict[str, str]] = []
    if resume_from is not None:
        state.load(resume_from)
        log_rank_zero(f"resumed from {resume_from} at step {progress.step}")
        if fabric.is_global_zero:
            earlier_metrics = read_metrics(out_dir, up_to_step=progress.step)
    if auto_micro_batch and fabric.device.type == "cuda":
        if isinstance(task, SupervisedTask):
            # The estimate's pick, checked by measuring: real forward and backward passes on synthetic rows.
            from litft.training.memory_probe import probe_micro_batch

            probe = probe_micro_batch(
                fabric, wrapped, objective, optimizer, per_device_rows=train.global_batch_size // fabric.world_size,
                seq_len=data.max_seq_length, vocab_size=model.config.vocab_size, start=train.micro_batch_size,
                packed=data.pack, compiler=compiler,
            )
            log_rank_zero(probe.describe(estimated=train.micro_batch_size))
            train = replace(train, micro_batch_size=probe.chosen)  # what run_config and fit below see
        else:
            log_rank_zero(
                f"--train.micro_batch_size auto: {train.micro_batch_size}, the estimate's pick, not probed: the probe "
                f"runs supervised rows, and a {task.name} row is a pair of answers"
            )

    # ---- loop --------------------------------------------------------------------------------------------------
    if replacing_previous_run and fabric.is_global_zero:
        clear_previous_run(out_dir)
    fabric.barrier()
    run_config = FinetuneRun(
        method=method, checkpoint=str(checkpoint), out_dir=str(out_dir), data=asdict(data), train=asdict(train),
        eval=asdict(eval), lora=asdict(lora) if lora is not None else None, quantize=quantize,
        precision=precision_name, devices=devices, num_nodes=num_nodes, strategy=strategy, seed=seed,
        extra={
            **task.run_config(),
            **({"fsdp_cpu_offload": fsdp_cpu_offload} if fsdp_cpu_offload else {}),
            **({"compiler": compiler} if compiler is not None else {}),
        },
    )
    sample_fn = make_sample_fn(model, tokenizer, template, eval) if eval.sample_prompt and not sharded else None
    result = fit(
        fabric, wrapped, optimizer, scheduler, objective, train_rows, val_rows, train, eval, out_dir, seed, state,
        sample_fn=sample_fn, should_stop=preemption,
    )
    for run_logger in fabric.loggers:
        run_logger.finalize("success" if result.stopped_early is None else "interrupted")
    if earlier_metrics:
        prepend_metrics(out_dir, earlier_metrics)
    if result.stopped_early == "signal":
        preemption.requeue()
        log_rank_zero(f"stopped by {preemption.name} at step {progress.step}; the checkpoint is saved in {out_dir}")
        return out_dir / "final"

    # ---- save --------------------------------------------------------------------------------------------------
    final_dir = out_dir / "final"
    if result.stopped_early is None:
        from litft.training.parallel import consolidated

        with consolidated(model, trained_only=method != "full") as full_weights:
            if fabric.is_global_zero:
                save_final(
                    method, model, checkpoint, read_hf_config(checkpoint), lora, template, run_config, final_dir,
                    state_dict=full_weights,
                )
                plot_history(progress.history, out_dir / "loss.png")
                task.plot(out_dir)
                log_rank_zero(f"saved {final_dir}")
    fabric.barrier()
    return final_dir


def load_for_strategy(
    fabric, method: str, checkpoint: Path, dtype: torch.dtype, lora_config: LoRAConfig | None, quantize: str | None
):
    """`load_for_training` for the run's strategy. Under FSDP2 only rank 0 reads the checkpoint, into host memory
    (a 4-bit base straight onto its device, where bitsandbytes quantizes fast); the other ranks get the structure
    alone, on the meta device, and receive their shards in `setup_for_strategy`."""
    from litft.training.strategies import is_fsdp

    if not is_fsdp(fabric):
        return load_for_training(method, checkpoint, dtype, fabric.device, lora_config, quantize)
    from litft.training.parallel import share_model

    load_device = fabric.device if method == "qlora" else torch.device("cpu")
    return share_model(
        fabric, lambda: load_for_training(method, checkpoint, dtype, load_device, lora_config, quantize, False)
    )


def setup_for_strategy(fabric, module: torch.nn.Module):
    """`fabric.setup_module(module)`; under FSDP2 the shards are then filled from rank 0's weights."""
    from litft.training.strategies import is_fsdp

    if not is_fsdp(fabric):
        return fabric.setup_module(module)
    from litft.training.parallel import load_full_state

    full_state = module.state_dict() if fabric.global_rank == 0 else None
    wrapped = fabric.setup_module(module)
    load_full_state(wrapped.module, full_state)
    return wrapped


def model_memory(method: str, checkpoint: Path, dtype: torch.dtype, lora_config: LoRAConfig | None, quantize: str | None):
    """What the model would take on one device unsharded (for `--strategy auto`), counted on the meta device."""
    from litft.adapters.lora import apply_lora, lora_modules
    from litft.adapters.quantization import QuantizedLinear, quantize_model
    from litft.checkpoint import read_hf_config
    from litft.models import build_model
    from litft.training.strategies import ModelMemory

    with torch.device("meta"):
        model = build_model(read_hf_config(checkpoint))
        if method == "qlora" and quantize is not None:
            quantize_model(model, quantize, compute_dtype=dtype)
        if method in ("lora", "qlora"):
            apply_lora(model, lora_config)
    element_size = torch.empty((), dtype=dtype).element_size()
    # 4-bit: half a byte per weight plus a one-byte scale per block of 64; 8-bit: one byte per weight; float8: two
    # copies of one byte (the forward's and the transposed one for the input gradient).
    quantized_bytes_per_weight = {"bnb.int8": 1.0, "fp8": 2.0}.get(quantize, 0.5 + 1 / 64)
    quantized = {id(m.weight) for m in model.modules() if isinstance(m, QuantizedLinear) or getattr(m, "quantization", None)}
    weight_bytes = sum(
        p.numel() * (quantized_bytes_per_weight if id(p) in quantized else element_size) for p in model.parameters()
    )
    if method == "full":
        trained = sum(p.numel() for p in model.parameters())
        trained_bytes = trained * element_size
    else:
        adapters = lora_modules(model).values()
        trained = sum(m.rank * (m.in_features + m.out_features) + (m.out_features if m.use_dora else 0) for m in adapters)
        trained_bytes = trained * 4  # adapters are float32
    return ModelMemory(weight_bytes=int(weight_bytes + trained_bytes), trained_parameters=trained, trained_bytes=trained_bytes)


def fit_micro_batch(
    train: TrainConfig, memory, method: str, checkpoint: Path, dtype: torch.dtype, data: DataConfig,
    accelerator: str, devices: int | str, num_nodes: int, compiled: bool = False,
) -> TrainConfig:
    """Resolves `--train.micro_batch_size auto` to the largest micro-batch whose estimated peak fits in 90% of the
    device, and logs the estimate for the micro-batch the run will use (all that `--dry_run` prints)."""
    from litft.checkpoint import read_hf_config
    from litft.training.estimate import available_device_bytes, estimate_run, largest_micro_batch
    from litft.training.strategies import count_devices, log

    hf_config = read_hf_config(checkpoint)
    world_size = count_devices(accelerator, devices) * num_nodes
    if train.global_batch_size % world_size:
        raise ConfigError(f"--train.global_batch_size {train.global_batch_size} must be a multiple of the {world_size} devices")

    def estimate_for(micro_batch_size: int):
        return estimate_run(hf_config, memory, method, dtype, micro_batch_size, data.max_seq_length,
                            train.activation_checkpointing, train.checkpointed_blocks, train.mlp_tile_tokens, compiled)

    if train.micro_batch_size == "auto":
        chosen = largest_micro_batch(estimate_for, train.global_batch_size // world_size, available_device_bytes())
        log(f"--train.micro_batch_size auto: {chosen} (the largest whose estimated peak fits in 90% of the device)")
        train = replace(train, micro_batch_size=chosen)
    log(estimate_for(train.micro_batch_size).describe(train.micro_batch_size, data.max_seq_length))
    return train


def padding_id(tokenizer) -> int:
    """The id that fills padded positions. Its value never matters to the loss (padding is masked by position),
    but it must be a valid embedding row."""
    for candidate in (tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return candidate
    return 0


def attention_description(config, device: torch.device) -> str:
    """Which kernels the model's attention runs in training, for the log (see `CausalLM.hidden_states`)."""
    soft_capped = getattr(config, "attn_logit_softcapping", None) is not None
    windowed = soft_capped or getattr(config, "sliding_window", None) is not None
    if flash_attention.check_setting(device):
        attention = "FlashAttention-4 (its variable-length kernels for packed rows)"
        if windowed and flash_attention.WINDOWS != "on":
            attention += ("; a window shorter than the rows or a soft-cap keeps the masks or flex_attention "
                          "(LITFT_FLASH_ATTENTION_4_WINDOWS=on gives them to the kernels)")
        return attention
    if not use_flex_attention(device):
        return "SDPA"
    return "SDPA (flex_attention for packed rows" + (" and soft-capped ones)" if soft_capped else ")")


def load_for_training(
    method: str,
    checkpoint: Path,
    dtype: torch.dtype,
    device: torch.device,
    lora_config: LoRAConfig | None,
    quantize: str | None,
    join_weights: bool = True,
):
    """Loads the base onto `device` in `dtype`; QLoRA quantizes each weight as it arrives, so the full-precision
    base never exists on the device. LoRA freezes the base and adds adapters; full fine-tuning trains everything.
    `join_weights`: give each q/k/v group one base GEMM and lay gate and up back to back (`join_frozen_weights`);
    not under FSDP2, which re-allocates every parameter as its own shard."""
    from litft.adapters.lora import apply_lora
    from litft.checkpoint import load_model

    prepare = None
    if method == "qlora":
        from litft.adapters.quantization import QUANTIZE_MODES, quantize_model

        if quantize not in QUANTIZE_MODES:
            raise ConfigError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
        if quantize == "fp8":
            from litft.adapters.float8 import float8_unsupported_reason

            why = float8_unsupported_reason(torch.device(device))
            if why is not None:
                raise ConfigError(f"--quantize fp8: {why}; use bnb.nf4 or plain LoRA on this GPU")
        compute_dtype = dtype

        def prepare(meta_model):
            quantize_model(meta_model, quantize, compute_dtype=compute_dtype)

    model = load_model(checkpoint, dtype=dtype, device=device, prepare=prepare)
    if method in ("lora", "qlora"):
        from litft.adapters.lora_projections import join_frozen_weights

        apply_lora(model, lora_config)
        if join_weights:
            join_frozen_weights(model)
        else:  # FSDP2: the frozen weights stay apart, but a mixture's expert adapters are still stacked (fewer shards)
            from litft.adapters.lora_experts import stack_mixture_adapters

            stack_mixture_adapters(model)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    model.train()
    return model


def make_sample_fn(model, tokenizer, template, eval_config: EvalConfig):
    """A function that greedily continues `--eval.sample_prompt` (wrapped in the chat template)."""
    from litft.generation import generate

    prompt = template.render([{"role": "user", "content": eval_config.sample_prompt}], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt)
    # A template's end-of-turn token (chatml's <|im_end|>) ends the answer even where it is not the tokenizer's EOS.
    stop_ids = tokenizer.stop_ids + [tokenizer.token_to_id(t) for t in template.stop_tokens if tokenizer.token_to_id(t) is not None]

    def sample() -> str:
        was_training = model.training
        model.eval()
        # Eager decoding: a short sample gains nothing from graph capture, and the model may be compiled or 4-bit.
        # Under --compile the blocks' forwards are torch.compile'd: decoding through them would compile a graph per
        # layer (each reads its own cache slot) until dynamo's recompile limit, so they run eagerly here.
        with torch.compiler.set_stance("force_eager"):
            result = generate(
                model, [prompt_ids], eval_config.max_new_tokens, stop_ids, pad_id=padding_id(tokenizer),
                use_cuda_graph=False,
            )
        model.train(was_training)
        return tokenizer.decode(result[0].token_ids)

    return sample


def save_final(
    method, model, checkpoint: Path, hf_config: dict, lora_config, template, run_config, final_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
):
    """The run's product: a PEFT adapter (LoRA / QLoRA) or a Hugging Face checkpoint (full), with the tokenizer
    files, the chat template used for training, and the run configuration without secrets. `state_dict`: the
    model's full weights when `model` itself holds only shards (FSDP2, full fine-tuning)."""
    from litft.chat_templates import save_chat_template
    from litft.checkpoint import AtomicDirectory, copy_tokenizer_files, write_hf_checkpoint

    run_payload = without_secrets({**asdict(run_config), "base_checkpoint": str(checkpoint.resolve())})
    with AtomicDirectory(final_dir) as tmp:
        if method == "full":
            write_hf_checkpoint(tmp, state_dict if state_dict is not None else model.state_dict(), hf_config)
        else:
            from litft.adapters.peft_format import save_peft_adapter

            # The adapter writer is atomic itself; it writes into a subfolder of our temporary folder.
            save_peft_adapter(model, lora_config, tmp / "adapter", base_model_name_or_path=str(checkpoint.resolve()))
            for item in (tmp / "adapter").iterdir():
                os.replace(item, tmp / item.name)
            (tmp / "adapter").rmdir()
        copy_tokenizer_files(checkpoint, tmp)
        save_chat_template(template, tmp)
        (tmp / "litft_run.json").write_text(json.dumps(run_payload, indent=2, default=str))
