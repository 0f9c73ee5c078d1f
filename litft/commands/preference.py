"""`litft finetune dpo | orpo | simpo`: preference alignment on pairs of a chosen and a rejected answer.

The recipe is the supervised one (`litft.commands.finetune.run_finetune`) with another `TrainingTask`: preference
pairs for data (`load_preference_datasets`) and a preference objective (`litft.training.preference`). Everything
else is shared: the model preparation (`--method lora | qlora | full`), strategies, resumable checkpoints, and
outputs (a PEFT adapter for `litft merge`, or a Hugging Face checkpoint).
"""

from __future__ import annotations

import copy
import csv
import textwrap
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from litft.adapters.lora import LoRAConfig
from litft.data import DataConfig
from litft.errors import ConfigError
from litft.training.config import EvalConfig, TrainConfig
from litft.training.preference import DPOConfig, ORPOConfig, PreferenceConfig, SimPOConfig

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from litft.chat_templates import ChatTemplate
    from litft.tokenizer import Tokenizer
    from litft.training.loop import Objective

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
            quantize: bnb.nf4, bnb.fp4 or bnb.int8: how the frozen base is stored (qlora); fp8: its multiplies in
                8-bit float, for speed (see `litft finetune qlora --help`).
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
            compile: Compile each decoder block, with --compiler.
            compiler: torch (torch.compile) or thunder (lightning-thunder's thunder.jit, which implies
                --compile; not with qlora, nor with activation checkpointing and --lora.dropout above 0).
            dry_run: Print the estimated peak memory and tokens/s per device, then stop without training.
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
    compiler: str = "torch",
    dry_run: bool = False,
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
    compiler: str = "torch",
    dry_run: bool = False,
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
    compiler: str = "torch",
    dry_run: bool = False,
) -> None:
    run_preference(objective=simpo, **_recipe_arguments(locals(), "simpo"))


def _recipe_arguments(arguments: dict, objective_name: str) -> dict:
    """The recipe's arguments without its objective's configuration, which is passed as `objective`."""
    return {name: value for name, value in arguments.items() if name != objective_name}


def run_preference(objective: PreferenceConfig, **arguments: Any) -> Path:
    """`run_finetune` on preference pairs with `objective`'s loss."""
    from litft.commands.finetune import run_finetune

    return run_finetune(task=PreferenceTask(objective), **arguments)


class PreferenceTask:
    """The `TrainingTask` of the preference recipes: one row is a pair of a chosen and a rejected answer."""

    data_path_help = "a .json/.jsonl/.parquet file of prompt/chosen/rejected pairs"

    def __init__(self, config: PreferenceConfig) -> None:
        self.config = config
        self.name = type(config).__name__.removesuffix("Config").lower()

    def validate(self, data: DataConfig) -> None:
        if data.pack:
            raise ConfigError("--data.pack: preference pairs are padded, not packed; remove --data.pack")
        self.config.validate()

    def keeps_frozen_copy(self, method: str) -> bool:
        # With adapters the reference is the policy with its adapters switched off; full fine-tuning has no such
        # switch, so it keeps the starting weights.
        return self.config.needs_reference and method == "full"

    def load_rows(
        self, data: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seed: int, log: Callable[[str], None]
    ) -> tuple[list[Any], list[Any] | None]:
        from litft.data import load_preference_datasets

        return load_preference_datasets(data, tokenizer, template, log=log)

    def make_objective(self, fabric: Fabric, model: nn.Module, tokenizer: Tokenizer, method: str) -> Objective:
        from litft.commands.finetune import padding_id, setup_for_strategy
        from litft.training.loss import CausalLMObjective
        from litft.training.preference import FrozenReference, PreferenceObjective, base_model_reference
        from litft.training.strategies import is_fsdp

        reference = base_model_reference if self.config.needs_reference else None
        if self.keeps_frozen_copy(method):
            # FSDP shards the copy like the policy; otherwise it stays whole on this device (DDP refuses to wrap a
            # module with nothing to train).
            frozen = CausalLMObjective(copy.deepcopy(model).requires_grad_(False))
            reference = FrozenReference(setup_for_strategy(fabric, frozen) if is_fsdp(fabric) else frozen, fabric.autocast)
        return PreferenceObjective(self.config, padding_id(tokenizer), reference)

    def run_config(self) -> dict[str, Any]:
        return {"objective": self.name, self.name: asdict(self.config)}

    def plot(self, out_dir: Path) -> None:
        plot_preference_metrics(out_dir / "metrics.csv", out_dir / "preference.png")


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
