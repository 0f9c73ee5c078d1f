"""`litft finetune dpo | orpo | simpo`: preference alignment on pairs of a chosen and a rejected answer.

The recipe is the supervised one with a different objective (`litft.training.preference`) and data
(`load_preference_datasets`): the same model preparation (`--method lora | qlora | full`), strategies, resumable
checkpoints, and outputs (a PEFT adapter for `litft merge`, or a Hugging Face checkpoint). It reads in the order it
runs: setup, data, model, reference, optimizer, loop, save.
"""

from __future__ import annotations

import copy
import csv
import textwrap
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from litft.adapters.lora import LoRAConfig
from litft.data import DataConfig
from litft.errors import ConfigError
from litft.training.config import EvalConfig, TrainConfig
from litft.training.preference import DPOConfig, ORPOConfig, PreferenceConfig, SimPOConfig

METHODS = ("lora", "qlora", "full")
INSTRUCT_CHECKPOINT = "A Hugging Face model folder, usually one already fine-tuned to follow instructions."


def recipe_help(summary: str, checkpoint: str, objective: tuple[str, str], full_lr: str) -> Callable:
    """Gives a recipe its docstring, which jsonargparse turns into `--help`: the arguments the three recipes share
    are described once, here."""
    objective_name, objective_help = objective

    def document(recipe: Callable) -> Callable:
        arguments = textwrap.dedent(f"""\
        Args:
            checkpoint: {checkpoint}
            out_dir: Where checkpoints, metrics and the final adapter or model go.
            data: Preference pairs: `prompt`, `chosen`, `rejected` as strings or message lists (see `litft data
                preview`).
            method: lora, qlora or full: what is trained.
            {objective_name}: {objective_help}
            lora: The adapters (lora and qlora).
            quantize: bnb.nf4, bnb.fp4 or bnb.int8: how the frozen base is stored (qlora).
            train: Batch sizes (in pairs), schedule, optimizer. With --method full, lower the lr ({full_lr}).
            eval: Validation.
            precision: bf16-true, bf16-mixed, 16-mixed, 16-true or 32-true (default: bf16-true on a GPU, 32-true on
                CPU).
            accelerator: auto, cuda or cpu.
            devices: Devices per node.
            num_nodes: Nodes (under SLURM, from the allocation).
            strategy: auto (DDP if the model, its optimizer state and a full fine-tuning reference fit on one
                device, else FSDP2), single, ddp or fsdp (FSDP2).
            fsdp_cpu_offload: With --strategy fsdp, keep the sharded weights, gradients and optimizer state in host
                memory.
            logger: csv, tensorboard, wandb or none.
            seed: Seed for data order, adapter initialisation and dropout.
            resume: "auto" (the latest checkpoint in out_dir) or a checkpoint folder to continue from. A requeued
                SLURM job resumes automatically.
            overwrite: Replace the results of an earlier run in out_dir.
            compile: torch.compile each decoder block.
        """)
        paragraphs = [textwrap.fill(paragraph, 110) for paragraph in summary.split("\n\n")]
        recipe.__doc__ = "\n\n".join([*paragraphs, arguments])
        return recipe

    return document


@recipe_help(
    "Direct Preference Optimization (or IPO, SLiC-hinge) on prompt / chosen / rejected pairs.\n\n"
    "The reference model is the starting model: with LoRA and QLoRA, the policy itself with its adapters switched "
    "off (no second copy of the weights); with full fine-tuning, a frozen copy.",
    checkpoint=INSTRUCT_CHECKPOINT,
    objective=("dpo", "The DPO loss."),
    full_lr="5e-7 to 5e-6",
)
def dpo(
    checkpoint: Path | None = None,
    out_dir: Path = Path("out/finetune/dpo"),
    data: DataConfig = DataConfig(),
    method: str = "lora",
    dpo: DPOConfig = DPOConfig(),
    lora: LoRAConfig = LoRAConfig(),
    quantize: str = "bnb.nf4",
    train: TrainConfig = TrainConfig(lr=5e-5),
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
) -> None:
    run_preference(objective=dpo, **_recipe_arguments(locals(), "dpo"))


@recipe_help(
    "Odds Ratio Preference Optimization: supervised fine-tuning and preference alignment in one pass, with no "
    "reference model; it can start from a base model.",
    checkpoint="A Hugging Face model folder.",
    objective=("orpo", "The ORPO loss."),
    full_lr="about 5e-6",
)
def orpo(
    checkpoint: Path | None = None,
    out_dir: Path = Path("out/finetune/orpo"),
    data: DataConfig = DataConfig(),
    method: str = "lora",
    orpo: ORPOConfig = ORPOConfig(),
    lora: LoRAConfig = LoRAConfig(),
    quantize: str = "bnb.nf4",
    train: TrainConfig = TrainConfig(lr=5e-5),
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
) -> None:
    run_preference(objective=orpo, **_recipe_arguments(locals(), "orpo"))


@recipe_help(
    "Simple Preference Optimization: a reference-free DPO on length-normalised log-probs with a target margin.",
    checkpoint=INSTRUCT_CHECKPOINT,
    objective=("simpo", "The SimPO loss."),
    full_lr="3e-7 to 1e-6",
)
def simpo(
    checkpoint: Path | None = None,
    out_dir: Path = Path("out/finetune/simpo"),
    data: DataConfig = DataConfig(),
    method: str = "lora",
    simpo: SimPOConfig = SimPOConfig(),
    lora: LoRAConfig = LoRAConfig(),
    quantize: str = "bnb.nf4",
    train: TrainConfig = TrainConfig(lr=5e-5),
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
) -> None:
    run_preference(objective=simpo, **_recipe_arguments(locals(), "simpo"))


def _recipe_arguments(arguments: dict, objective_name: str) -> dict:
    """The recipe's arguments without its objective's configuration, which is passed as `objective`."""
    return {name: value for name, value in arguments.items() if name != objective_name}


def run_preference(
    objective: PreferenceConfig,
    method: str,
    checkpoint: Path | None,
    out_dir: Path,
    data: DataConfig,
    lora: LoRAConfig,
    quantize: str,
    train: TrainConfig,
    eval: EvalConfig,
    precision: str | None,
    accelerator: str,
    devices: int | str,
    num_nodes: int,
    strategy: str,
    fsdp_cpu_offload: bool,
    logger: str,
    seed: int,
    resume: str | None,
    overwrite: bool,
    compile: bool,
) -> Path:
    from lightning.fabric.utilities.seed import seed_everything

    from litft.chat_templates import resolve_chat_template
    from litft.checkpoint import checkpoint_dir_or_error, read_hf_config
    from litft.commands.finetune import (
        FinetuneRun,
        load_for_training,
        make_loggers,
        make_sample_fn,
        model_memory,
        padding_id,
        prepare_out_dir,
        prepend_metrics,
        read_metrics,
        save_final,
    )
    from litft.data import load_preference_datasets
    from litft.tokenizer import Tokenizer
    from litft.training.loop import Progress, TrainingState, fit, plot_history, total_steps
    from litft.training.loss import CausalLMObjective
    from litft.training.optim import make_optimizer, make_scheduler
    from litft.training.parallel import consolidated, load_full_state, share_model
    from litft.training.preference import FrozenReference, PreferenceObjective, base_model_reference
    from litft.training.signals import PreemptionSignal, resume_after_requeue
    from litft.training.strategies import is_fsdp, log, make_fabric, resolve_precision

    # ---- setup -------------------------------------------------------------------------------------------------
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if checkpoint is None:
        raise ConfigError("--checkpoint is required: a Hugging Face model folder (see `litft download`)")
    if data.path is None:
        raise ConfigError("--data.path is required: a .json/.jsonl/.parquet file of prompt/chosen/rejected pairs")
    if data.pack:
        raise ConfigError("--data.pack: preference pairs are padded, not packed; remove --data.pack")
    objective.validate()
    train.validate()
    checkpoint = checkpoint_dir_or_error(checkpoint)
    out_dir = Path(out_dir)
    adapters = lora if method != "full" else None
    quantize_mode = quantize if method == "qlora" else None
    frozen_reference = objective.needs_reference and method == "full"
    resume = resume_after_requeue(resume)
    precision_name, weights_dtype, fabric_precision = resolve_precision(precision, accelerator)
    memory = None
    if strategy == "auto":
        memory = model_memory(method, checkpoint, weights_dtype, adapters, quantize_mode)
        if frozen_reference:  # the frozen copy weighs as much as the trained weights
            memory = replace(memory, weight_bytes=memory.weight_bytes + memory.trained_bytes)
    fabric = make_fabric(
        accelerator, devices, num_nodes, strategy, fabric_precision, make_loggers(logger, out_dir), memory,
        fsdp_cpu_offload,
    )
    fabric.launch()
    preemption = PreemptionSignal(fabric)  # from here on SIGUSR1 / SIGTERM save a checkpoint and stop
    resume_from = prepare_out_dir(out_dir, resume, overwrite, fabric.is_global_zero)
    seed_everything(seed, verbose=False)
    log_rank_zero = (lambda message: log(message)) if fabric.is_global_zero else (lambda message: None)

    # ---- data --------------------------------------------------------------------------------------------------
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    template = resolve_chat_template(tokenizer, data.template)
    with fabric.rank_zero_first():  # rank 0 tokenizes and fills the cache; the others read it
        train_pairs, val_pairs = load_preference_datasets(data, tokenizer, template, log=log_rank_zero)

    # ---- model -------------------------------------------------------------------------------------------------
    sharded = is_fsdp(fabric)
    if sharded:
        # As in supervised fine-tuning: rank 0 loads, the other ranks get the structure and receive shards.
        load_device = fabric.device if method == "qlora" else torch.device("cpu")
        model = share_model(fabric, lambda: load_for_training(method, checkpoint, weights_dtype, load_device, adapters, quantize_mode))
    else:
        model = load_for_training(method, checkpoint, weights_dtype, fabric.device, adapters, quantize_mode)
    # Copied before activation checkpointing and compilation change the policy's forward.
    reference_model = copy.deepcopy(model).requires_grad_(False) if frozen_reference else None
    if train.activation_checkpointing:
        from litft.training.strategies import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if compile:
        for block in model.blocks:
            block.compile()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log_rank_zero(f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trained, "
                  f"precision {precision_name}, template {template.name}, objective {type(objective).__name__}")

    def setup(module: CausalLMObjective) -> nn.Module:
        full_state = module.state_dict() if sharded and fabric.global_rank == 0 else None
        wrapped_module = fabric.setup_module(module)
        if sharded:
            load_full_state(wrapped_module.module, full_state)
        return wrapped_module

    wrapped = setup(CausalLMObjective(model))

    # ---- reference ---------------------------------------------------------------------------------------------
    reference = base_model_reference if objective.needs_reference else None
    if reference_model is not None:
        # FSDP shards the copy like the policy; otherwise it already sits whole on this device (DDP refuses to wrap
        # a module with nothing to train).
        frozen = CausalLMObjective(reference_model)
        reference = FrozenReference(setup(frozen) if sharded else frozen, fabric.autocast)

    # ---- optimizer ---------------------------------------------------------------------------------------------
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, train))
    scheduler = make_scheduler(optimizer, total_steps(train, len(train_pairs)), train)
    progress = Progress()
    state = TrainingState(fabric, wrapped, optimizer, scheduler, progress, full_weights=method == "full")
    earlier_metrics: list[dict[str, str]] = []
    if resume_from is not None:
        state.load(resume_from)
        log_rank_zero(f"resumed from {resume_from} at step {progress.step}")
        if fabric.is_global_zero:
            earlier_metrics = read_metrics(out_dir, up_to_step=progress.step)

    # ---- loop --------------------------------------------------------------------------------------------------
    objective_name = type(objective).__name__.removesuffix("Config").lower()
    run_config = FinetuneRun(
        method=method, checkpoint=str(checkpoint), out_dir=str(out_dir), data=asdict(data), train=asdict(train),
        eval=asdict(eval), lora=asdict(adapters) if adapters is not None else None, quantize=quantize_mode,
        precision=precision_name, devices=devices, num_nodes=num_nodes, strategy=strategy, seed=seed,
        extra={"objective": objective_name, objective_name: asdict(objective), "fsdp_cpu_offload": fsdp_cpu_offload},
    )
    sample_fn = make_sample_fn(model, tokenizer, template, eval) if eval.sample_prompt and not sharded else None
    result = fit(
        fabric, wrapped, optimizer, scheduler, PreferenceObjective(objective, padding_id(tokenizer), reference),
        train_pairs, val_pairs, train, eval, out_dir, seed, state, sample_fn=sample_fn, should_stop=preemption,
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
        with consolidated(model, trained_only=method != "full") as full_weights:
            if fabric.is_global_zero:
                save_final(
                    method, model, checkpoint, read_hf_config(checkpoint), adapters, template, run_config, final_dir,
                    state_dict=full_weights,
                )
                plot_history(progress.history, out_dir / "loss.png")
                plot_preference_metrics(out_dir / "metrics.csv", out_dir / "preference.png")
                log_rank_zero(f"saved {final_dir}")
    fabric.barrier()
    return final_dir


# Panels of the preference plot: the metrics drawn together in each.
PLOT_PANELS = (
    ("loss",),
    ("rewards/chosen", "rewards/rejected"),
    ("rewards/margin",),
    ("rewards/accuracy",),
    ("logps/chosen", "logps/rejected"),
)


def plot_preference_metrics(metrics_csv: Path, path: Path) -> Path | None:
    """Loss, rewards, margin, accuracy and log-probs of the train and validation splits, from the CSV log, as one
    PNG (skipped without matplotlib or without the CSV logger)."""
    if not metrics_csv.is_file():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with metrics_csv.open(newline="") as file:
        rows = list(csv.DictReader(file))

    def series(column: str) -> list[tuple[float, float]]:
        return [(float(row["step"]), float(row[column])) for row in rows if row.get(column)]

    figure, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(4 * len(PLOT_PANELS), 3.5))
    for axis, names in zip(axes, PLOT_PANELS):
        for color, name in zip(("tab:blue", "tab:red"), names):
            # One colour per metric; validation dashed with markers.
            for split, style in (("train", {}), ("val", {"linestyle": "--", "marker": "o"})):
                points = series(f"{split}/{name}")
                if points:
                    axis.plot(*zip(*points), color=color, label=f"{split} {name}", **style)
        axis.set_xlabel("step")
        axis.set_title(" / ".join(names))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
