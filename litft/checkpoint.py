"""Hugging Face checkpoint folders in and out.

In: `config.json` picks the family; weights come from `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or (only if no safetensors exist) `pytorch_model.bin` read with
`torch.load(weights_only=True)`, which refuses pickles that would run code. The model is built on the meta device
and every tensor is assigned straight into place in the requested dtype and device, one tensor at a time, so no
float32 copy of the whole model and no full CPU copy is ever made.

Out: safetensors shards plus index, config.json, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from litft.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Files that are copied along with weights when a checkpoint is written (merge, full fine-tuning).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# Keys some checkpoints carry that are not weights of the model.
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def checkpoint_dir_or_error(checkpoint_dir: str | Path) -> Path:
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such folder (download one with `litft download ORG/NAME`)")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            hint = "it is an adapter folder: give its base model as --checkpoint and this folder as --adapter"
        elif (path / "final").is_dir():
            hint = f"it looks like a litft run folder: its output is {path / 'final'}"
        else:
            hint = "a Hugging Face checkpoint folder is expected"
        raise CheckpointError(f"{path}: no config.json; {hint}")
    return path


def is_or_holds(folder: str | Path, path: str | Path) -> bool:
    """Whether `folder` is `path` or one of its parent folders: replacing `folder` would delete `path`."""
    folder, path = Path(folder).resolve(), Path(path).resolve()
    return folder == path or folder in path.parents


def read_hf_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = checkpoint_dir_or_error(checkpoint_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}: no `model_type` field; is this a Hugging Face model config?")
    # Multimodal wrappers (e.g. Gemma 3) keep the language model's config under `text_config`.
    return config


# safetensors' names for the floating dtypes a model is loaded in.
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def checkpoint_dtype(checkpoint_dir: str | Path, hf_config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint loads in when none is asked for: config.json's `dtype` / `torch_dtype` where it
    names one litft knows; otherwise (absent, "auto") the dtype its safetensors store the first floating tensor
    in, as transformers' "auto" reads it, rather than float32, which would double a bf16 model's memory; float32
    for a pickled checkpoint, whose dtypes cannot be read without loading it."""
    name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "").replace("torch.", "")
    if name in DTYPES:
        return DTYPES[name]
    from safetensors import SafetensorError, safe_open

    for file in weight_files(checkpoint_dir):
        if file.suffix != ".safetensors":
            break
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    stored = handle.get_slice(key).get_dtype()
                    if stored in SAFETENSORS_DTYPES:
                        return SAFETENSORS_DTYPES[stored]
        except SafetensorError as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    return torch.float32


def weight_files(checkpoint_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint, safetensors preferred."""
    root = Path(checkpoint_dir)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index}: not a valid weight index ({error})") from None
            files = sorted({root / name for name in weight_map.values()})
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{index}: lists {file.name}, which is missing from {root}")
            return files
    for name in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (root / name).is_file():
            return [root / name]
    others = sorted(root.glob("*.safetensors"))
    if others:
        return others
    raise CheckpointError(
        f"{root}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE})"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time; safetensors are memory-mapped, so only the current tensor is read."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as error:
                raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({error})") from None
        else:
            yield from load_bin_file(file).items()


def load_bin_file(file: Path) -> dict[str, torch.Tensor]:
    """Reads a PyTorch `.bin` with `weights_only=True`: tensors and plain containers only, never arbitrary code."""
    import pickle

    import zipfile

    try:
        # Memory-mapping needs the zip container torch.save has written since 1.6; older files are read whole.
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "disallowed object"
        raise CheckpointError(
            f"{file}: refused to unpickle: the file holds more than tensors ({first_line}); convert it to "
            "safetensors from a trusted source"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{file}: corrupt or unreadable .bin checkpoint ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dictionary of tensors, found {type(state).__name__}")
    return state


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    loader = getattr(module, "load_checkpoint_tensor", None)
    if loader is not None:
        # Layers that store weights differently (4-bit QLoRA bases) take the tensor and convert it themselves.
        loader(param_name, tensor)
        return
    old = getattr(module, param_name)
    if isinstance(old, nn.Parameter):
        setattr(module, param_name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        module.register_buffer(param_name, tensor)


def load_weights(
    model: nn.Module,
    checkpoint_dir: str | Path,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str | None] | None = None,
    split: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None,
) -> None:
    """Assigns every checkpoint tensor into `model` (built on the meta device), casting floating tensors to
    `dtype` (None keeps the file's) on `device`. Fails with one line for missing, unknown or misshapen weights."""
    files = weight_files(checkpoint_dir)
    expected = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    expected.update({name: b for name, b in model.named_buffers()})
    rename = rename or getattr(model, "checkpoint_key", None)
    loaded: set[str] = set()
    for file_name, tensor in iter_tensors(files):
        name = rename(file_name) if rename else file_name
        if name is None or name.endswith(IGNORED_KEY_SUFFIXES) and name not in expected:
            continue
        if name not in expected:
            raise CheckpointError(
                f"{checkpoint_dir}: unexpected weight {file_name!r} for {type(model).__name__}; the config and weights "
                "do not match"
            )
        target = expected[name]
        if tuple(target.shape) != tuple(tensor.shape) and not getattr(target, "accepts_any_shape", False):
            raise CheckpointError(
                f"{checkpoint_dir}: weight {file_name!r} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(target.shape)}"
            )
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        else:
            tensor = tensor.to(device=device)
        _set_tensor(model, name, tensor)
        loaded.add(name)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing = [n for n in expected if n not in loaded and not (tied and n.endswith("lm_head.weight"))]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{checkpoint_dir}: weights missing from the checkpoint: {shown}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def load_model(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    prepare: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Builds the family of `checkpoint_dir/config.json` on the meta device and loads its weights.

    `prepare(model)` runs on the meta model before any weight is loaded: this is where LoRA or 4-bit layers are
    swapped in, so a 4-bit base is quantized tensor by tensor as it loads and never exists in bf16 at once."""
    from litft.models import build_model

    checkpoint_dir = checkpoint_dir_or_error(checkpoint_dir)
    hf_config = read_hf_config(checkpoint_dir)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = checkpoint_dtype(checkpoint_dir, hf_config)
    with torch.device("meta"):
        model = build_model(hf_config, source=str(checkpoint_dir / "config.json"))
    if prepare is not None:
        prepare(model)
    load_weights(model, checkpoint_dir, dtype, device)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{checkpoint_dir}: no weights found for {', '.join(still_meta[:3])}")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


class AtomicDirectory:
    """Writes a folder under a temporary name beside its target and renames it into place on success.

    An existing target is moved aside only after the new folder is complete, then removed, so a crash at any
    point leaves either the old folder or the new one, never half of each."""

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        except OSError as error:
            raise CheckpointError(f"{self.target}: cannot create it ({error.strerror or error}); choose a folder "
                                  "you can write to") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            # A full disk or a lost mount while writing: one line, nothing of the old output changed.
            from safetensors import SafetensorError

            if issubclass(exc_type, (OSError, SafetensorError)):
                reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
                raise CheckpointError(f"{self.target}: writing failed ({reason}); nothing there was changed") from exc
            return
        _readable_as_umask_allows(self.tmp)
        old = None
        if self.target.exists() or self.target.is_symlink():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _readable_as_umask_allows(folder: Path) -> None:
    """mkdtemp makes its folder owner-only (0700) and safetensors writes owner-only files: give the output the
    permissions a plain mkdir and open would, so that another user (an inference server, a shared cluster
    account) can read what litft wrote."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_safetensors_shards(
    state_dict: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 5 * 1024**3, prefix: str = "model"
) -> None:
    """Writes `state_dict` as one `model.safetensors` or as shards plus `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().nbytes() != nbytes:  # a view into a larger storage (weights laid back to back)
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{prefix}.safetensors"), metadata=metadata)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        file = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=metadata)
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> None:
    for name in TOKENIZER_FILES:
        file = Path(source) / name
        if file.is_file():
            shutil.copy2(file, Path(destination) / name)


def write_hf_checkpoint(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Writes weights (tied duplicates dropped, optionally cast) and config.json into an existing folder; callers
    make it atomic by writing into an `AtomicDirectory`."""
    tied = hf_config.get("tie_word_embeddings", False)
    state = {}
    for name, tensor in state_dict.items():
        if tied and name.endswith("lm_head.weight"):
            continue
        state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    config = dict(hf_config)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        config["torch_dtype"] = name
        config["dtype"] = name
    save_safetensors_shards(state, folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def save_hf_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    hf_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
    tokenizer_source: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Writes a Hugging Face checkpoint folder atomically: weights, config.json and, from `tokenizer_source`, the
    tokenizer and generation files; `extra_files` are copied in too (those that exist)."""
    state_dict = state_dict if state_dict is not None else model.state_dict()
    with AtomicDirectory(out_dir) as tmp:
        write_hf_checkpoint(tmp, state_dict, hf_config, dtype, max_shard_bytes)
        if tokenizer_source is not None:
            copy_tokenizer_files(tokenizer_source, tmp)
        for file in extra_files:
            if Path(file).is_file():
                shutil.copyfile(file, tmp / Path(file).name)
    return Path(out_dir)
