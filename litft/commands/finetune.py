"""`litft finetune lora | qlora | full`: the supervised fine-tuning recipes.

One recipe body serves all three methods and reads in the order it runs: setup, data, model, optimizer, loop,
save. The methods differ only in how the model is prepared (LoRA adapters, a 4-bit base, or every weight trained)
and in what is saved (a PEFT adapter, or a full Hugging Face checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from litft.adapters.lora import LoRAConfig
from litft.data import DataConfig
from litft.errors import ConfigError
from litft.training.config import EvalConfig, TrainConfig

LOGGERS = ("csv", "tensorboard", "wandb", "none")


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
    logger: str = "csv",
    seed: int = 42,
    resume: str | None = None,
    overwrite: bool = False,
    compile: bool = False,
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
        strategy: auto, single, ddp or fsdp (FSDP2).
        logger: csv, tensorboard, wandb or none.
        seed: Seed for data order, adapter initialisation and dropout.
        resume: "auto" (the latest checkpoint in out_dir) or a checkpoint folder to continue from.
        overwrite: Replace the results of an earlier run in out_dir.
        compile: torch.compile each decoder block.
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
    logger: str = "csv",
    seed: int = 42,
    resume: str | None = None,
    overwrite: bool = False,
    compile: bool = False,
) -> None:
    """Fine-tune LoRA adapters on a base model stored in 4-bit (or 8-bit); writes a PEFT-format adapter.

    Args:
        checkpoint: A Hugging Face model folder (see `litft download`).
        out_dir: Where checkpoints, metrics and the final adapter go.
        data: The dataset (see `litft data preview`).
        lora: The adapters.
        train: Batch sizes, schedule, optimizer.
        eval: Validation.
        quantize: bnb.nf4, bnb.fp4 or bnb.int8: how the frozen base weights are stored.
        precision: Compute precision (default: bf16-true on a GPU, 32-true on CPU).
        accelerator: auto, cuda or cpu.
        devices: Devices per node.
        num_nodes: Nodes.
        strategy: auto, single, ddp or fsdp (FSDP2).
        logger: csv, tensorboard, wandb or none.
        seed: Seed for data order, adapter initialisation and dropout.
        resume: "auto" or a checkpoint folder to continue from.
        overwrite: Replace the results of an earlier run in out_dir.
        compile: torch.compile each decoder block.
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
    logger: str = "csv",
    seed: int = 42,
    resume: str | None = None,
    overwrite: bool = False,
    compile: bool = False,
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
        strategy: auto, single, ddp or fsdp (FSDP2).
        logger: csv, tensorboard, wandb or none.
        seed: Seed for data order and dropout.
        resume: "auto" or a checkpoint folder to continue from.
        overwrite: Replace the results of an earlier run in out_dir.
        compile: torch.compile each decoder block.
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


SECRET_WORDS = ("token", "secret", "password", "api_key")


def without_secrets(value: Any) -> Any:
    """Drops every entry whose key names a secret, at any depth, before a configuration is written to disk."""
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if not any(w in str(k).lower() for w in SECRET_WORDS)}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value


def prepare_out_dir(out_dir: Path, resume: str | None, overwrite: bool, is_global_zero: bool) -> Path | None:
    """Refuses to write into a previous run's folder unless resuming or overwriting; returns the checkpoint to
    resume from, if any."""
    from litft.training.loop import checkpoint_folder, latest_checkpoint

    if resume is not None:
        if resume == "auto":
            return latest_checkpoint(out_dir)
        path = Path(resume)
        if not (path / "state.ckpt").exists():
            raise ConfigError(f"--resume {resume}: no state.ckpt in that folder; pass a folder from {checkpoint_folder(out_dir)}")
        return path
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"--out_dir {out_dir} already holds a run; pass --resume auto to continue it or --overwrite true to replace it"
            )
        if is_global_zero:
            shutil.rmtree(checkpoint_folder(out_dir), ignore_errors=True)
            for name in ("metrics.csv", "loss.png", "hparams.yaml"):
                (out_dir / name).unlink(missing_ok=True)
    return None


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
    lora: LoRAConfig | None = None,
    quantize: str | None = None,
) -> Path:
    from lightning.fabric.utilities.seed import seed_everything

    from litft.chat_templates import resolve_chat_template
    from litft.checkpoint import checkpoint_dir_or_error, read_hf_config
    from litft.data import load_datasets, make_rows
    from litft.tokenizer import Tokenizer
    from litft.training.loop import Progress, TrainingState, fit, plot_history, total_steps
    from litft.training.loss import CausalLMObjective
    from litft.training.objectives import SupervisedObjective
    from litft.training.optim import make_optimizer, make_scheduler
    from litft.training.strategies import log, make_fabric, resolve_precision

    # ---- setup -------------------------------------------------------------------------------------------------
    if checkpoint is None:
        raise ConfigError("--checkpoint is required: a Hugging Face model folder (see `litft download`)")
    if data.path is None:
        raise ConfigError("--data.path is required: a .json/.jsonl/.parquet file or a folder of them")
    checkpoint = checkpoint_dir_or_error(checkpoint)
    train.validate()
    out_dir = Path(out_dir)
    precision_name, weights_dtype, fabric_precision = resolve_precision(precision, accelerator)
    fabric = make_fabric(accelerator, devices, num_nodes, strategy, fabric_precision, make_loggers(logger, out_dir))
    fabric.launch()
    resume_from = prepare_out_dir(out_dir, resume, overwrite, fabric.is_global_zero)
    seed_everything(seed, verbose=False)
    log_rank_zero = (lambda message: log(message)) if fabric.is_global_zero else (lambda message: None)

    # ---- data --------------------------------------------------------------------------------------------------
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    template = resolve_chat_template(tokenizer, data.template)
    with fabric.rank_zero_first():  # rank 0 tokenizes and fills the cache; the others read it
        train_samples, val_samples = load_datasets(data, tokenizer, template, log=log_rank_zero)
    train_rows = make_rows(train_samples, data.max_seq_length, data.pack, seed)
    val_rows = make_rows(val_samples, data.max_seq_length, data.pack, seed) if val_samples else None

    # ---- model -------------------------------------------------------------------------------------------------
    model = load_for_training(method, checkpoint, weights_dtype, fabric.device, lora, quantize)
    if train.activation_checkpointing:
        from litft.training.strategies import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if compile:
        for block in model.blocks:
            block.compile()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log_rank_zero(f"model: {type(model).__name__}, {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trained, "
                  f"precision {precision_name}, template {template.name}")
    wrapped = fabric.setup_module(CausalLMObjective(model))

    # ---- optimizer ---------------------------------------------------------------------------------------------
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, train))
    steps = total_steps(train, len(train_rows))
    scheduler = make_scheduler(optimizer, steps, train)
    progress = Progress()
    state = TrainingState(fabric, wrapped, optimizer, scheduler, progress, full_weights=method == "full")
    if resume_from is not None:
        state.load(resume_from)
        log_rank_zero(f"resumed from {resume_from} at step {progress.step}")

    # ---- loop --------------------------------------------------------------------------------------------------
    run_config = FinetuneRun(
        method=method, checkpoint=str(checkpoint), out_dir=str(out_dir), data=asdict(data), train=asdict(train),
        eval=asdict(eval), lora=asdict(lora) if lora is not None else None, quantize=quantize,
        precision=precision_name, devices=devices, num_nodes=num_nodes, strategy=strategy, seed=seed,
    )
    sample_fn = make_sample_fn(model, tokenizer, template, eval) if eval.sample_prompt else None
    result = fit(
        fabric, wrapped, optimizer, scheduler, SupervisedObjective(pad_id=tokenizer.pad_id or 0), train_rows,
        val_rows, train, eval, out_dir, seed, state, sample_fn=sample_fn,
    )

    # ---- save --------------------------------------------------------------------------------------------------
    final_dir = out_dir / "final"
    if result.stopped_early is None and fabric.is_global_zero:
        save_final(method, model, checkpoint, read_hf_config(checkpoint), lora, template, run_config, final_dir)
        plot_history(progress.history, out_dir / "loss.png")
        log_rank_zero(f"saved {final_dir}")
    fabric.barrier()
    return final_dir


def load_for_training(
    method: str,
    checkpoint: Path,
    dtype: torch.dtype,
    device: torch.device,
    lora_config: LoRAConfig | None,
    quantize: str | None,
):
    """Loads the base onto `device` in `dtype`; QLoRA quantizes each weight as it arrives, so the full-precision
    base never exists on the device. LoRA freezes the base and adds adapters; full fine-tuning trains everything."""
    from litft.adapters.lora import apply_lora
    from litft.checkpoint import load_model

    prepare = None
    if method == "qlora":
        from litft.adapters.quantization import QUANTIZE_MODES, quantize_model

        if quantize not in QUANTIZE_MODES:
            raise ConfigError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
        compute_dtype = dtype

        def prepare(meta_model):
            quantize_model(meta_model, quantize, compute_dtype=compute_dtype)

    model = load_model(checkpoint, dtype=dtype, device=device, prepare=prepare)
    if method in ("lora", "qlora"):
        apply_lora(model, lora_config)
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

    def sample() -> str:
        was_training = model.training
        model.eval()
        result = generate(model, [prompt_ids], eval_config.max_new_tokens, tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0)
        model.train(was_training)
        return tokenizer.decode(result[0].token_ids)

    return sample


def save_final(method, model, checkpoint: Path, hf_config: dict, lora_config, template, run_config, final_dir: Path):
    """The run's product: a PEFT adapter (LoRA / QLoRA) or a Hugging Face checkpoint (full), with the tokenizer
    files, the chat template used for training, and the run configuration without secrets."""
    from litft.chat_templates import save_chat_template
    from litft.checkpoint import AtomicDirectory, copy_tokenizer_files, write_hf_checkpoint

    run_payload = without_secrets({**asdict(run_config), "base_checkpoint": str(checkpoint.resolve())})
    with AtomicDirectory(final_dir) as tmp:
        if method == "full":
            write_hf_checkpoint(tmp, model.state_dict(), hf_config)
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
