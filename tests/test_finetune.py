"""The fine-tuning recipes end to end, on CPU: the loss does not depend on how a global batch is split, a killed run
resumes exactly, training the real pretrained model moves it in the trained direction, and bad input stops early."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litft.cli import main

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = ROOT / "litft" / "assets" / "data" / "identity_500.sharegpt.json"


def read_metrics(out_dir: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(out_dir / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for key, value in row.items():
                if value not in ("", None) and key != "step":
                    rows.setdefault(step, {})[key] = float(value)
    return rows


def finetune(method: str, checkpoint: Path, out_dir: Path, *flags: str) -> None:
    main([
        "finetune", method, "--checkpoint", str(checkpoint), "--out_dir", str(out_dir), "--accelerator", "cpu",
        "--precision", "32-true", "--data.path", str(IDENTITY), "--data.template", "plain", "--seed", "7", *flags,
    ])


def one_step_flags(micro_batch_size: int, pack: bool) -> list[str]:
    return [
        "--train.global_batch_size", "8", "--train.micro_batch_size", str(micro_batch_size), "--train.max_steps", "1",
        # SGD: the update is the gradient itself (Adam's first step is sign-like and amplifies rounding where g ~ 0).
        "--train.optimizer", "sgd", "--train.lr", "1.0", "--train.warmup_steps", "0", "--train.lr_scheduler", "constant",
        # A huge clipping threshold: never clips, but logs the gradient norm, which the comparison needs.
        "--train.max_norm", "1e9", "--data.limit", "60" if pack else "8", "--data.max_seq_length", "160" if pack else "400",
        "--data.pack", str(pack).lower(), "--lora.rank", "4", "--lora.targets", "[all-linear]",
    ]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_one_step_is_the_same_however_the_global_batch_is_split(tmp_path, stories_dir, pack):
    results = {}
    for micro_batch_size in (1, 2, 4, 8):
        out_dir = tmp_path / f"micro{micro_batch_size}"
        finetune("lora", stories_dir, out_dir, *one_step_flags(micro_batch_size, pack))
        metrics = read_metrics(out_dir)[1]
        adapter = load_file(out_dir / "final" / "adapter_model.safetensors")
        results[micro_batch_size] = (metrics["train/loss"], metrics["train/grad_norm"], adapter)
    loss, grad_norm, adapter = results[8]
    for micro_batch_size in (1, 2, 4):
        other_loss, other_norm, other_adapter = results[micro_batch_size]
        assert other_loss == pytest.approx(loss, rel=1e-6)
        assert other_norm == pytest.approx(grad_norm, rel=1e-5)
        for name, tensor in adapter.items():
            # float32 sums of 8 partial gradients versus one: rounding alone reaches ~1e-6; a wrong weighting of
            # micro-batches moves the update by percents.
            relative_error = (other_adapter[name] - tensor).norm() / tensor.norm()
            assert relative_error < 5e-6, (micro_batch_size, name, relative_error)


def test_samples_of_very_different_lengths_are_weighted_by_tokens_not_by_micro_batch(tmp_path, stories_dir):
    """The mean of per-micro-batch means would weight a short sample's tokens more than a long one's; the loss
    logged must be the plain mean over every trained token of the global batch."""
    from litft.chat_templates import resolve_chat_template
    from litft.checkpoint import load_model
    from litft.data import DataConfig, collate, load_datasets, make_rows
    from litft.tokenizer import Tokenizer

    out_dir = tmp_path / "run"
    finetune("lora", stories_dir, out_dir, *one_step_flags(1, pack=False), "--logger", "csv")
    logged = read_metrics(out_dir)[1]["train/loss"]

    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    template = resolve_chat_template(tokenizer, "plain")
    config = DataConfig(path=str(IDENTITY), template="plain", limit=8, max_seq_length=400, cache_dir=str(tmp_path))
    samples, _ = load_datasets(config, tokenizer, template, log=lambda message: None)
    lengths = [int((s["targets"] != -100).sum()) for s in samples]
    assert max(lengths) > 2 * min(lengths)
    model = load_model(stories_dir, dtype=torch.float32)
    batch = collate(make_rows(samples, 400, pack=False, seed=0), pad_id=0)
    with torch.no_grad():
        logits = model(batch["input_ids"])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    assert logged == pytest.approx(expected.item(), rel=1e-5)


def test_killed_run_resumes_with_the_same_losses(tmp_path, stories_dir):
    flags = [
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "30",
        "--train.save_interval", "5", "--train.lr", "3e-3", "--train.warmup_steps", "3", "--lora.dropout", "0.1",
        "--data.limit", "200", "--data.max_seq_length", "128", "--data.pack", "true",
    ]
    straight = tmp_path / "straight"
    finetune("lora", stories_dir, straight, *flags)

    interrupted = tmp_path / "interrupted"
    command = [
        sys.executable, "-m", "litft", "finetune", "lora", "--checkpoint", str(stories_dir), "--out_dir",
        str(interrupted), "--accelerator", "cpu", "--precision", "32-true", "--data.path", str(IDENTITY),
        "--data.template", "plain", "--seed", "7", *flags,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (interrupted / "checkpoints" / "step-00000010").exists() and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists(), "the run finished before it could be killed"

    finetune("lora", stories_dir, interrupted, *flags, "--resume", "auto")
    expected, resumed = read_metrics(straight), read_metrics(interrupted)
    for step in range(11, 31):
        assert resumed[step]["train/loss"] == expected[step]["train/loss"], step
    reference = load_file(straight / "final" / "adapter_model.safetensors")
    for name, tensor in load_file(interrupted / "final" / "adapter_model.safetensors").items():
        assert torch.equal(tensor, reference[name]), name


def test_fine_tuning_the_pretrained_model_moves_it_toward_the_data(tmp_path, stories_dir, capsys):
    out_dir = tmp_path / "quick"
    prompt = "What is your name?"
    main(["generate", "--checkpoint", str(stories_dir), "--chat", "true", "--chat_template", "plain", "--prompt",
          prompt, "--max_new_tokens", "30"])
    before = capsys.readouterr().out
    finetune("lora", stories_dir, out_dir, "--train.global_batch_size", "16", "--train.micro_batch_size", "8",
             "--train.epochs", "2", "--train.lr", "3e-3", "--data.max_seq_length", "256", "--data.val_split", "0.1",
             "--eval.interval", "5", "--lora.rank", "16", "--lora.alpha", "32", "--lora.targets", "[all-linear]")
    metrics = read_metrics(out_dir)
    validation = [m["val/loss"] for _, m in sorted(metrics.items()) if "val/loss" in m]
    assert validation[-1] < 0.5 * validation[0]
    last_step = max(step for step, m in metrics.items() if "val/loss" in m)
    assert metrics[last_step]["val/perplexity"] == pytest.approx(math.exp(validation[-1]), rel=1e-6)
    # stderr here is not a terminal (as in a SLURM job's log): no progress bar redrawn with carriage returns, a line
    # per logged step instead, with the loss metrics.csv has.
    log = capsys.readouterr().err
    assert "\r" not in log
    trained = {step: m["train/loss"] for step, m in metrics.items() if "train/loss" in m}
    lines = [line for line in log.splitlines() if line.startswith("step ") and ": loss " in line]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == sorted(trained)
    for line in lines:
        step = int(line.split()[1].split("/")[0])
        assert line.startswith(f"step {step}/{max(trained)}: loss {trained[step]:.4f}, lr ")
    main(["generate", "--checkpoint", str(out_dir / "final"), "--chat", "true", "--prompt", prompt,
          "--max_new_tokens", "30"])
    after = capsys.readouterr().out
    assert "Vicuna" in after or "language model" in after, after
    assert "Vicuna" not in before and "language model" not in before, before
    assert (out_dir / "loss.png").stat().st_size > 1000


def test_only_a_terminal_gets_the_progress_bar(monkeypatch):
    """rank 0 draws a progress bar on a terminal; in a log file (stderr not a terminal) and on other ranks there is
    none, and the loop prints a line per logged step instead (above)."""
    from types import SimpleNamespace

    from litft.training.loop import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = _progress_bar(SimpleNamespace(global_rank=0), 10, 0)
    assert bar is not None
    bar.update(1)
    bar.close()
    assert "\r" in sys.stderr.getvalue()
    assert _progress_bar(SimpleNamespace(global_rank=1), 10, 0) is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert _progress_bar(SimpleNamespace(global_rank=0), 10, 0) is None


def test_full_fine_tuning_writes_a_checkpoint_transformers_loads(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from litft.checkpoint import load_model

    out_dir = tmp_path / "full"
    finetune("full", tiny_llama_dir, out_dir, "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
             "--train.max_steps", "2", "--train.lr", "1e-3", "--data.limit", "8", "--data.max_seq_length", "64")
    ours = load_model(out_dir / "final", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(out_dir / "final", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)
    base = load_model(tiny_llama_dir, dtype=torch.float32)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, ours.model.layers[0].mlp.up_proj.weight)


def test_existing_out_dir_is_not_overwritten(tmp_path, stories_dir, capsys):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        finetune("lora", stories_dir, out_dir, "--train.max_steps", "1", "--data.limit", "16")
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("litft: error: --out_dir") and "--overwrite" in error[-1]
    assert "is not empty and holds no run" in error[-1]  # not "already holds a run": there is none
    assert (out_dir / "precious.txt").read_text() == "keep me"


def test_overwrite_keeps_the_previous_run_until_the_data_and_model_have_loaded(tmp_path, stories_dir, capsys):
    out_dir = tmp_path / "run"
    for name in ("checkpoints/step-5/marker.txt", "metrics.csv", "final/adapter_config.json"):
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text("previous run")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(SystemExit):
        finetune("lora", stories_dir, out_dir, "--overwrite", "true", "--data.path", str(bad), "--data.limit", "8")
    assert "bad.jsonl line 2" in capsys.readouterr().err
    assert all((out_dir / name).read_text() == "previous run"
               for name in ("checkpoints/step-5/marker.txt", "metrics.csv", "final/adapter_config.json"))
    finetune("lora", stories_dir, out_dir, "--overwrite", "true", "--train.max_steps", "1", "--data.limit", "8",
             "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--data.max_seq_length", "64")
    assert not (out_dir / "checkpoints" / "step-5").exists()
    assert (out_dir / "metrics.csv").read_text() != "previous run"
    assert json.loads((out_dir / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train.global_batch_size", "6", "--train.micro_batch_size", "4"], "--train.global_batch_size"),
        (["--train.lr", "-1"], "--train.lr -1.0: must be positive"),
        (["--train.micro_batch_size", "-3"], "--train.micro_batch_size -3: must be at least 1"),
        (["--train.global_batch_size", "0"], "--train.global_batch_size 0: must be at least 1"),
        (["--train.max_steps", "0"], "--train.max_steps 0: must be at least 1"),
        (["--train.epochs", "0"], "--train.epochs 0: must be at least 1"),
        (["--train.log_interval", "0"], "--train.log_interval 0: must be at least 1"),
        (["--train.save_interval", "0"], "--train.save_interval 0: must be at least 1"),
        (["--train.warmup_steps", "-1"], "--train.warmup_steps -1: must be 0 or more"),
        (["--train.beta2", "1.0"], "--train.beta2 1.0: must be at least 0 and below 1"),
        (["--train.max_norm", "0"], "--train.max_norm 0.0: must be positive"),
        (["--train.max_time", "0"], "--train.max_time 0.0: must be a positive number of seconds"),
        (["--eval.interval", "0"], "--eval.interval 0: must be at least 1"),
        (["--eval.max_batches", "0"], "--eval.max_batches 0: must be at least 1"),
        (["--eval.max_new_tokens", "0"], "--eval.max_new_tokens 0: must be at least 1"),
        (["--train.min_lr_ratio", "2"], "--train.min_lr_ratio 2.0: must be between 0 and 1"),
        (["--train.weight_decay", "-0.1"], "--train.weight_decay -0.1: must be 0 or more"),
        (["--lora.rank", "0"], "--lora.rank"),
        (["--precision", "fp8"], "--precision"),
    ],
)
def test_bad_flags_give_one_line(tmp_path, stories_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        finetune("lora", stories_dir, tmp_path / "out", "--data.limit", "16", *flags)
    assert exit_info.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("litft: error:") and message in last


@pytest.mark.parametrize("written", ["flag", "yaml"])
@pytest.mark.parametrize(
    "targets, modules",
    [("q,v", ["q_proj", "v_proj"]),
     ("all-linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])],
)
def test_lora_targets_as_one_comma_separated_string(tmp_path, stories_dir, written, targets, modules):
    """`--lora.targets q,v` and `targets: all-linear` in a YAML file, as other tools write them, adapt the layers the
    list form `[q,v]` names (the exported adapter lists them)."""
    if written == "flag":
        flags = ["--lora.targets", targets]
    else:
        config = tmp_path / "run.yaml"
        config.write_text(f"lora:\n  targets: {targets}\n")
        flags = ["--config", str(config)]
    finetune("lora", stories_dir, tmp_path / "out", "--data.limit", "8", "--train.max_steps", "1",
             "--train.global_batch_size", "4", "--train.micro_batch_size", "4", *flags)
    adapter = json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == modules


def test_tiled_mlp_and_partial_checkpointing_train_the_same_step(tmp_path, stories_dir, monkeypatch):
    """--train.mlp_tile_tokens and --train.checkpointed_blocks reach the model and leave the step unchanged."""
    import litft.training.tiling as tiling

    tiled_models = []
    enable = tiling.enable_tiled_mlp
    monkeypatch.setattr(tiling, "enable_tiled_mlp", lambda model, tokens: (tiled_models.append(model), enable(model, tokens)))
    finetune("lora", stories_dir, tmp_path / "plain", *one_step_flags(4, pack=True))
    finetune("lora", stories_dir, tmp_path / "tiled", *one_step_flags(4, pack=True), "--train.mlp_tile_tokens", "100",
             "--train.activation_checkpointing", "offload", "--train.checkpointed_blocks", "2")
    assert len(tiled_models) == 1 and all(isinstance(b.mlp.forward, tiling.TiledForward) for b in tiled_models[0].blocks)
    offloaded = [hasattr(block, "activation_offload") for block in tiled_models[0].blocks]
    assert len(offloaded) > 2 and offloaded == [True, True] + [False] * (len(offloaded) - 2)
    plain, tiled = read_metrics(tmp_path / "plain")[1], read_metrics(tmp_path / "tiled")[1]
    assert tiled["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-6)
    assert tiled["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-5)
    # The saved run configuration keeps settings whose names contain "token" (the secrets filter once dropped them).
    run = json.loads((tmp_path / "tiled" / "final" / "litft_run.json").read_text())
    assert run["train"]["mlp_tile_tokens"] == 100 and run["eval"]["max_new_tokens"] == 50


def test_saved_configuration_drops_secrets_and_keeps_settings_named_after_tokens():
    from litft.commands.finetune import without_secrets

    token = "hf_" + "aB3" * 12
    config = {
        "access_token": "x", "hf_token": "x", "token": "x", "wandb_api_key": "x", "db_password": "x",
        "client_secret": "x", "logger": {"auth_token": "x", "name": "run", "note": token},
        "tags": ["a", token], "max_new_tokens": 50, "mlp_tile_tokens": 100, "pad_token": "<pad>",
        "eos_token": "</s>", "tokens_per_step": 8, "tokenizer": "path/hf_tokenizer_files", "path": "/data/hf_cache",
    }
    assert without_secrets(config) == {
        "logger": {"name": "run"}, "tags": ["a"], "max_new_tokens": 50, "mlp_tile_tokens": 100, "pad_token": "<pad>",
        "eos_token": "</s>", "tokens_per_step": 8, "tokenizer": "path/hf_tokenizer_files", "path": "/data/hf_cache",
    }


def test_non_finite_loss_stops_the_run(tmp_path, stories_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune("lora", stories_dir, tmp_path / "out", "--data.limit", "16", "--train.global_batch_size", "4",
                 "--train.micro_batch_size", "4", "--train.max_steps", "3", "--train.lr", "1e30",
                 "--train.warmup_steps", "0", "--train.max_norm", "null")
    assert exit_info.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("litft: error:") and "loss became" in last


@pytest.mark.parametrize(
    "offload, blocks", [(False, None), (True, None), (False, 1), (True, 1)],
    ids=["recompute", "recompute+offload", "first-block", "first-block+offload"],
)
def test_activation_checkpointing_keeps_loss_and_gradients(tiny_llama_dir, offload, blocks):
    from litft.adapters.lora import LoRAConfig, apply_lora
    from litft.checkpoint import load_model
    from litft.training.loss import CausalLMObjective
    from litft.training.strategies import enable_activation_checkpointing

    def loss_and_grads(checkpointed: bool):
        torch.manual_seed(0)
        model = load_model(tiny_llama_dir, dtype=torch.float32)
        apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"], dropout=0.1))
        if checkpointed:
            enable_activation_checkpointing(model, offload=offload, blocks=blocks)
        mlp_calls = [0] * len(model.blocks)
        # A pre-hook: recomputation stops as soon as the last saved tensor is rebuilt, before the block returns.
        for index, block in enumerate(model.blocks):
            block.mlp.register_forward_pre_hook(lambda *_, index=index: mlp_calls.__setitem__(index, mlp_calls[index] + 1))
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the same dropout masks in both runs (recomputation replays the RNG state)
        loss = CausalLMObjective(model.train())(ids, ids.roll(-1, dims=1))
        offloaded = len(model.blocks) if blocks is None else blocks
        if checkpointed and offload:
            # Every checkpointed block's input waits in host memory until its backward takes it back.
            pending = model.blocks[0].activation_offload.owner.pending
            assert [checkpoint.input.host.device.type for checkpoint in pending] == ["cpu"] * offloaded
        loss.backward()
        if checkpointed and offload:
            assert not pending
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, mlp_calls

    plain_loss, plain_grads, plain_calls = loss_and_grads(False)
    loss, grads, calls = loss_and_grads(True)
    assert len(calls) > 1 and plain_calls == [1] * len(calls)
    # The checkpointed blocks really ran again in the backward; with `blocks`, only the first ones did.
    recomputed = len(calls) if blocks is None else blocks
    assert calls == [2] * recomputed + [1] * (len(calls) - recomputed)
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("budget", ["enough", "no-host-memory", "one-call-per-block"])
def test_offloaded_blocks_take_o_and_down_from_their_forward_instead_of_recomputing_them(
    tiny_llama_dir, monkeypatch, budget, device
):
    """Offloaded checkpointing keeps the outputs of the projections that widen a token little (o, down; q/k/v with
    few key/value heads) in host memory and hands them to the recomputation, which then runs only the other groups'
    base GEMMs; the gradients stay those of a run without checkpointing. With no host memory to spare every group
    is computed again; with room on the device for one group's outputs per block, the rest are. On a GPU the kept
    outputs travel through pinned memory on a side stream, as the block inputs do."""
    import litft.adapters.lora_projections as projections
    from litft.adapters.lora import LoRAConfig, apply_lora
    from litft.checkpoint import load_model
    from litft.training.loss import CausalLMObjective
    from litft.training.strategies import KEPT_OUTPUT_WIDENING, enable_activation_checkpointing

    computed = []  # (output width, input width) of each group whose base GEMMs ran
    base_and_updates = projections._base_and_updates

    def counting(x, *args):
        computed.append((sum(args[6]), x.shape[-1]))  # args[6]: the layers' out_features
        return base_and_updates(x, *args)

    monkeypatch.setattr(projections, "_base_and_updates", counting)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)

    def run(offload: bool, block_budget: float | None = None):
        torch.manual_seed(0)
        model = load_model(tiny_llama_dir, dtype=torch.float32)
        apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"]))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.02)
        model.to(device)
        if offload:
            enable_activation_checkpointing(model, offload=True)
            owner = model.blocks[0].activation_offload.owner
            if budget == "no-host-memory":
                owner.kept_budget = 0
            if block_budget is not None:
                owner.block_budget = block_budget
        computed.clear()
        loss = CausalLMObjective(model.train())(ids, ids.roll(-1, dims=1))
        in_forward = list(computed)
        if offload:
            kept = [checkpoint for block in owner.pending for call in block.outputs.calls for checkpoint in call or ()]
            assert (owner.kept_bytes > 0) == bool(kept) == (budget != "no-host-memory")
            assert all(checkpoint.host.device.type == "cpu" for checkpoint in kept)
            assert all(checkpoint.host.is_pinned() for checkpoint in kept) or device == "cpu"
        computed.clear()
        loss.backward()
        if offload:
            assert not owner.pending and owner.kept_bytes == 0  # everything kept was taken back
        grads = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad}
        return loss.detach(), grads, in_forward, list(computed), len(model.blocks)

    plain_loss, plain_grads, plain_forward, plain_backward, blocks = run(offload=False)
    per_block = plain_forward[: len(plain_forward) // blocks]
    keepable = [(out_width, in_width) for out_width, in_width in per_block
                if out_width <= KEPT_OUTPUT_WIDENING * in_width]
    assert 0 < len(keepable) < len(per_block)  # gate/up widen too much to keep; o and down are kept
    if budget == "enough":
        recomputed = [call for call in per_block if call not in keepable]
    elif budget == "no-host-memory":
        recomputed = per_block
    else:  # only the block's first keepable call fits
        first = per_block.index(keepable[0])
        recomputed = per_block[:first] + per_block[first + 1 :]
    first_bytes = ids.numel() * keepable[0][0] * 4  # float32
    loss, grads, in_forward, in_backward, _ = run(True, first_bytes if budget == "one-call-per-block" else None)
    assert plain_backward == [] and in_forward == plain_forward
    assert in_backward == recomputed * blocks
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_out_of_memory_is_answered_with_what_to_lower(tmp_path, stories_dir, capsys, monkeypatch):
    import litft.training.loop as loop

    def out_of_memory(*args, **kwargs):  # what a CUDA allocation failure raises inside the step
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        finetune("lora", stories_dir, tmp_path / "out", "--data.limit", "16", "--train.global_batch_size", "4",
                 "--train.micro_batch_size", "4", "--train.max_steps", "2")
    assert exit_info.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("litft: error: the GPU ran out of memory")
    assert "--train.micro_batch_size" in last and "--data.max_seq_length" in last


def test_dry_run_prints_an_estimate_and_auto_picks_a_micro_batch(tmp_path, tiny_llama_dir, capsys):
    out_dir = tmp_path / "dry"
    finetune("lora", tiny_llama_dir, out_dir, "--dry_run", "true", "--train.micro_batch_size", "auto",
             "--train.global_batch_size", "8", "--data.max_seq_length", "64")
    err = capsys.readouterr().err
    assert "--train.micro_batch_size auto: 8" in err  # a tiny model fits the whole per-device batch
    assert "estimate for micro-batch 8 x 64 tokens: peak memory about" in err
    assert not (out_dir / "final").exists() and not (out_dir / "checkpoints").exists()


@pytest.mark.parametrize(
    "shape, micro_batch_size, checkpointing, compiled, measured_gib",
    # Peaks measured on an H200 (LoRA rank 16 on all seven projections, 2048 tokens per row): compiled,
    # benchmarks/results/2026-11-29-session12-lora1b-lora8b-rows.jsonl (the loss's gradient written over its logits;
    # offloaded: ...-session10-kept-outputs-ckpt8b.jsonl, with the q/k/v, o and down outputs kept); eager,
    # ...-session13-lora1b-eager-peak.jsonl (the down projection's gated operator keeping gate and up only).
    [
        ("llama-1b", 8, False, True, 16.47),
        ("llama-8b", 4, False, True, 40.03),
        ("llama-8b", 8, "offload", True, 18.79),
        ("llama-1b", 8, False, False, 20.42),
    ],
)
def test_memory_estimate_is_close_to_what_was_measured(tmp_path, shape, micro_batch_size, checkpointing, compiled,
                                                      measured_gib):
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import SHAPES, hf_config

    from litft.adapters.lora import LoRAConfig
    from litft.commands.finetune import model_memory
    from litft.training.estimate import estimate_run

    config = hf_config(SHAPES[shape])
    (tmp_path / "config.json").write_text(json.dumps(config))
    lora = LoRAConfig(rank=16, alpha=32, targets=["q", "k", "v", "o", "gate", "up", "down"])
    memory = model_memory("lora", tmp_path, torch.bfloat16, lora, None)
    estimate = estimate_run(config, memory, "lora", torch.bfloat16, micro_batch_size, 2048, checkpointing,
                            compiled=compiled)
    assert estimate.peak_gib == pytest.approx(measured_gib, rel=0.06)


def test_the_estimate_caps_kept_outputs_as_the_run_does(tmp_path, monkeypatch):
    """Offloaded checkpointing: the kept outputs that arrive during a recomputation count up to the runtime's
    per-block budget (`strategies.kept_bytes_per_block`, uncapped on CPU), and what is not kept is recomputed."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import SHAPES, hf_config

    from litft.adapters.lora import LoRAConfig
    from litft.commands.finetune import model_memory
    from litft.training import estimate

    config = hf_config(SHAPES["llama-1b"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    memory = model_memory("lora", tmp_path, torch.bfloat16, LoRAConfig(rank=16, alpha=32, targets=["all-linear"]),
                          None)

    def run(budget):
        monkeypatch.setattr(estimate, "kept_bytes_per_block", lambda: budget)
        return estimate.estimate_run(config, memory, "lora", torch.bfloat16, 8, 2048, "offload", compiled=True)

    kept_bytes = 8 * 2048 * estimate.kept_projections(config)[0] * 2
    uncapped, half, none = run(float("inf")), run(kept_bytes / 2), run(0)
    assert (uncapped.activations_gib - none.activations_gib) * 2**30 == pytest.approx(kept_bytes)
    assert (half.activations_gib - none.activations_gib) * 2**30 == pytest.approx(kept_bytes / 2)
    assert uncapped.flops_per_token < half.flops_per_token < none.flops_per_token


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_model_counts_what_a_block_saves_for_its_backward(compiled):
    """The estimate's bytes per token and layer against what autograd really keeps for one LoRA decoder block,
    eager and compiled, counted with saved-tensor hooks (per token: the difference between two sequence lengths,
    so the weight-sized stacked adapter factors drop out) on shapes that vary hidden, intermediate and KV width."""
    from litft.adapters.lora import LoRAConfig, apply_lora
    from litft.models import build_model
    from litft.models.common import build_attention_context, default_position_ids
    from litft.training.compilation import compile_blocks
    from litft.training.estimate import activation_bytes_per_token_per_layer

    def saved_bytes(config: dict, tokens: int) -> int:
        torch.manual_seed(0)
        model = build_model(config).to(torch.bfloat16)
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all-linear"]))
        if compiled:
            torch._dynamo.reset()
            compile_blocks(model, "torch")
        x = torch.randn(1, tokens, config["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
        cos, sin = model.model.rotary_emb(default_position_ids(1, tokens, 0, x.device))
        context = build_attention_context(1, tokens, x.device, None, None, None)
        storages: dict[int, int] = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model.blocks[0](x, cos, sin, context)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(size for pointer, size in storages.items() if pointer not in parameters)

    for hidden, intermediate, kv_heads in ((256, 1024, 2), (512, 1024, 2), (256, 2048, 2), (256, 1024, 8)):
        config = {
            "model_type": "llama", "vocab_size": 64, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
        }
        per_token = (saved_bytes(config, 128) - saved_bytes(config, 64)) / 64
        estimated = activation_bytes_per_token_per_layer(config, 2, compiled)
        assert estimated == pytest.approx(per_token, rel=0.06), (hidden, intermediate, kv_heads)


def test_checkpointing_fewer_blocks_is_estimated_between_none_and_all(tmp_path):
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import SHAPES, hf_config

    from litft.adapters.lora import LoRAConfig
    from litft.commands.finetune import model_memory
    from litft.training.estimate import estimate_run

    config = hf_config(SHAPES["llama-8b"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    memory = model_memory("lora", tmp_path, torch.bfloat16, LoRAConfig(rank=16, targets=["all-linear"]), None)

    def estimate(checkpointing, blocks=None):
        return estimate_run(config, memory, "lora", torch.bfloat16, 4, 2048, checkpointing, blocks)

    peaks = [estimate(True, blocks).activations_gib for blocks in (32, 24, 8, 0)]
    assert peaks[0] == estimate(True).activations_gib and peaks[-1] == estimate(False).activations_gib
    assert peaks == sorted(peaks) and len(set(peaks)) == 4  # each block left out keeps its activations
    speeds = [estimate(True, blocks).flops_per_token for blocks in (32, 24, 0)]
    assert speeds == sorted(speeds, reverse=True)  # fewer recomputed blocks, fewer FLOPs
    # A tiled MLP: the same for sequences within one tile, less for longer ones (the intermediates of one tile).
    def long_run(tile=None, seq_len=2048):
        return estimate_run(config, memory, "lora", torch.bfloat16, 1, seq_len, "offload", None, tile).activations_gib

    assert long_run(8192) == long_run()
    assert long_run(8192, 262144) < 0.7 * long_run(None, 262144)


def test_checkpointed_blocks_without_checkpointing_is_refused(tmp_path, stories_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune("lora", stories_dir, tmp_path / "out", "--data.limit", "16", "--train.checkpointed_blocks", "2")
    assert exit_info.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("litft: error: --train.checkpointed_blocks needs --train.activation_checkpointing")


def test_an_unknown_template_names_the_data_flag(tmp_path, stories_dir, capsys):
    with pytest.raises(SystemExit):
        finetune("lora", stories_dir, tmp_path / "out", "--data.limit", "16", "--data.template", "no-such-template")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("litft: error: --data.template 'no-such-template': unknown")


def test_samples_past_the_models_positions_are_noted(tmp_path, stories_dir, capsys):
    from litft.chat_templates import resolve_chat_template
    from litft.commands.finetune import longest_sequence, warn_past_context
    from litft.data import DataConfig, load_datasets, load_preference_datasets, make_rows
    from litft.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    template = resolve_chat_template(tokenizer, "plain")
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Tell a story. " * words, "output": "Once."}) + "\n"
                            for words in (1, 40, 3)))
    samples, _ = load_datasets(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")), tokenizer, template,
                               log=lambda line: None)
    longest = max(len(sample["input_ids"]) for sample in samples)
    assert longest > 100
    for pack in (False, True):
        assert longest_sequence(make_rows(samples, 1024, pack, seed=0)) == longest
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Tell a story. " * 40, "chosen": "Once.", "rejected": "No."}) + "\n")
    pair_rows, _ = load_preference_datasets(DataConfig(path=str(pairs), cache_dir=str(tmp_path / "cache")),
                                            tokenizer, template, log=lambda line: None)
    assert longest_sequence(pair_rows) == max(len(pair_rows[0][side]["input_ids"]) for side in ("chosen", "rejected"))

    notes = []
    warn_past_context(make_rows(samples, 1024, True, seed=0), {"max_position_embeddings": longest}, notes.append)
    assert not notes

    # Through the command: stories260K was trained for 512 positions, this document is ~700 tokens.
    document = tmp_path / "story.txt"
    document.write_text(" ".join(f"Once upon a time there was a cat number {i}." for i in range(60)))
    finetune("lora", stories_dir, tmp_path / "out", "--data.path", str(document), "--data.max_seq_length", "1024",
             "--train.global_batch_size", "1", "--train.micro_batch_size", "1", "--train.max_steps", "1")
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: the longest")]
    assert len(warning) == 1 and "past the 512 positions of the checkpoint's max_position_embeddings" in warning[0]


def test_an_out_dir_that_would_replace_the_checkpoint_is_refused(tmp_path, stories_dir, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stories_dir, run / "final")  # a previous run's output, now the base of the next run
    shutil.copytree(stories_dir, run / "checkpoints" / "step-4")
    cases = ((run / "final", run), (run / "checkpoints" / "step-4", run), (run / "final", run / "final"))
    for checkpoint, out_dir in cases:
        with pytest.raises(SystemExit):
            main(["finetune", "lora", "--checkpoint", str(checkpoint), "--out_dir", str(out_dir), "--accelerator",
                  "cpu", "--data.path", str(IDENTITY), "--overwrite", "true"])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"litft: error: --out_dir {out_dir}") and "choose another --out_dir" in error
    assert (run / "final" / "config.json").is_file() and (run / "checkpoints" / "step-4" / "config.json").is_file()
