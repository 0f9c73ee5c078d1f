"""`litft merge` through the CLI: the merged folder loads in transformers and reproduces the adapted model; bad
input is refused in one line and never touches an existing output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LLAMA, save_tiny_hf_model
from test_lora import hf_model, input_ids, litft_lora_model, randomize_adapter

from litft.adapters.lora import LoRAConfig
from litft.adapters.peft_format import save_peft_adapter
from litft.cli import main


def write_adapter(checkpoint_dir, folder, config: LoRAConfig) -> torch.Tensor:
    """Saves a random adapter for `checkpoint_dir` and returns the adapted model's logits."""
    model = litft_lora_model(checkpoint_dir, config)
    randomize_adapter(model)
    save_peft_adapter(model, config, folder, str(checkpoint_dir))
    with torch.no_grad():
        return model(input_ids())


def run_merge(*args: str) -> None:
    main(["merge", *map(str, args)])


def refused(capsys, *args: str) -> str:
    capsys.readouterr()  # drop what building the fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        run_merge(*args)
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip()
    assert error.startswith("litft: error: ") and "\n" not in error and "Traceback" not in error
    return error


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(rank=4, alpha=8, targets=["q", "v", "lm_head"]),
        LoRAConfig(rank=4, alpha=8, targets=["all-linear"], dora=True, rslora=True),
    ],
)
def test_merged_checkpoint_loads_in_transformers_with_the_adapted_logits(tiny_llama_dir, tmp_path, config):
    adapted_logits = write_adapter(tiny_llama_dir, tmp_path / "adapter", config)
    run_merge(
        "--checkpoint",
        tiny_llama_dir,
        "--adapter",
        tmp_path / "adapter",
        "--out_dir",
        tmp_path / "merged",
        "--max_shard_size",
        "100KB",
    )

    merged = tmp_path / "merged"
    assert len(list(merged.glob("model-*.safetensors"))) > 1 and (merged / "model.safetensors.index.json").is_file()
    assert (merged / "tokenizer.json").is_file()
    assert not list(merged.glob("adapter_*")) and not list(tmp_path.glob(".merged*"))
    with torch.no_grad():
        logits = hf_model(merged)(input_ids=input_ids()).logits
    torch.testing.assert_close(logits, adapted_logits, atol=1e-5, rtol=1e-5)


def test_merge_precision_and_base_from_the_adapter_config(tiny_llama_dir, tmp_path):
    write_adapter(tiny_llama_dir, tmp_path / "adapter", LoRAConfig(rank=4, targets=["q"]))
    # No --checkpoint: the adapter records its local base folder.
    run_merge("--adapter", tmp_path / "adapter", "--out_dir", tmp_path / "merged", "--precision", "bfloat16")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_missing_adapter_folder_is_refused(tiny_llama_dir, tmp_path, capsys):
    error = refused(
        capsys, "--checkpoint", tiny_llama_dir, "--adapter", tmp_path / "nope", "--out_dir", tmp_path / "out"
    )
    assert "--adapter" in error and "no such folder" in error
    assert not (tmp_path / "out").exists()


def test_adapter_for_a_different_model_is_refused(tiny_llama_dir, tmp_path, capsys):
    other = save_tiny_hf_model(
        tmp_path / "other",
        "LlamaConfig",
        "LlamaForCausalLM",
        **{**TINY_LLAMA, "hidden_size": 32, "intermediate_size": 64},
    )
    write_adapter(other, tmp_path / "adapter", LoRAConfig(rank=4, targets=["q"]))
    error = refused(
        capsys, "--checkpoint", tiny_llama_dir, "--adapter", tmp_path / "adapter", "--out_dir", tmp_path / "out"
    )
    assert "has shape (4, 32), the model needs (4, 64)" in error and "different base model" in error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_is_kept_unless_overwrite(tiny_llama_dir, tmp_path, capsys):
    write_adapter(tiny_llama_dir, tmp_path / "adapter", LoRAConfig(rank=4, targets=["q"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("--checkpoint", tiny_llama_dir, "--adapter", tmp_path / "adapter", "--out_dir", out)
    error = refused(capsys, *args)
    assert f"--out_dir {out} exists and is not empty" in error and "--overwrite" in error
    assert (out / "keep.txt").read_text() == "mine"

    run_merge(*args, "--overwrite", "true")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "flag, value, message",
    [("--precision", "fp8", "--precision 'fp8': choose auto"), ("--max_shard_size", "lots", "--max_shard_size 'lots'")],
)
def test_bad_flags_are_refused(tiny_llama_dir, tmp_path, capsys, flag, value, message):
    write_adapter(tiny_llama_dir, tmp_path / "adapter", LoRAConfig(rank=4, targets=["q"]))
    error = refused(
        capsys,
        "--checkpoint",
        tiny_llama_dir,
        "--adapter",
        tmp_path / "adapter",
        "--out_dir",
        tmp_path / "out",
        flag,
        value,
    )
    assert message in error


def test_an_out_dir_holding_the_inputs_is_refused_even_with_overwrite(tiny_llama_dir, tmp_path, capsys):
    """Replacing such an out_dir would delete the base model or the adapter (it did, with --overwrite true)."""
    import shutil

    parent = tmp_path / "work"
    shutil.copytree(tiny_llama_dir, parent / "base")
    write_adapter(parent / "base", parent / "adapter", LoRAConfig(rank=4, targets=["q"]))
    for out_dir, named in ((parent, "--checkpoint"), (parent / "adapter", "--adapter"), (tmp_path, "--checkpoint")):
        error = refused(capsys, "--checkpoint", parent / "base", "--adapter", parent / "adapter", "--out_dir", out_dir,
                        "--overwrite", "true")
        assert f"--out_dir {out_dir}: must not be {named} or a folder holding it" in error
    assert (parent / "base" / "config.json").is_file() and (parent / "adapter" / "adapter_config.json").is_file()


def test_the_merged_model_keeps_the_adapters_chat_template_and_is_readable_by_others(tiny_llama_dir, tmp_path):
    import os
    import stat

    from litft.chat_templates import ChatTemplate, save_chat_template

    write_adapter(tiny_llama_dir, tmp_path / "adapter", LoRAConfig(rank=4, targets=["q"]))
    template = ChatTemplate("alpaca", "{{ messages[0]['content'] }}", {}, ["</s>"])
    save_chat_template(template, tmp_path / "adapter")
    previous = os.umask(0o022)
    try:
        run_merge("--checkpoint", tiny_llama_dir, "--adapter", tmp_path / "adapter", "--out_dir", tmp_path / "out")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert (out / "chat_template.jinja").read_text() == template.source
    assert json.loads((out / "litft_template.json").read_text())["name"] == "alpaca"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(file.stat().st_mode) == 0o644 for file in out.iterdir())


def test_a_bad_rank_in_the_adapter_config_or_an_unwritable_out_dir_is_one_line(tiny_llama_dir, tmp_path, capsys):
    write_adapter(tiny_llama_dir, tmp_path / "adapter", LoRAConfig(rank=4, targets=["q"]))
    config_file = tmp_path / "adapter" / "adapter_config.json"
    good = config_file.read_text()
    config_file.write_text(json.dumps({**json.loads(good), "r": "four"}))
    error = refused(capsys, "--checkpoint", tiny_llama_dir, "--adapter", tmp_path / "adapter", "--out_dir",
                    tmp_path / "out")
    assert "adapter_config.json: field 'r' is 'four'; expected a positive number" in error
    config_file.write_text(good)
    (tmp_path / "a_file").write_text("")
    error = refused(capsys, "--checkpoint", tiny_llama_dir, "--adapter", tmp_path / "adapter", "--out_dir",
                    tmp_path / "a_file" / "merged")
    assert f"{tmp_path / 'a_file' / 'merged'}: cannot create it" in error


def test_a_failed_write_leaves_the_old_output_and_no_temporary_folder(tmp_path):
    """Whatever fails while an output is written (here: the disk, as an OSError), the old output stays whole."""
    from litft.checkpoint import AtomicDirectory
    from litft.errors import CheckpointError

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match=r"out: writing failed \(No space left on device\)"):
        with AtomicDirectory(out) as folder:
            (folder / "half.bin").write_bytes(b"x")
            raise OSError(28, "No space left on device")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
