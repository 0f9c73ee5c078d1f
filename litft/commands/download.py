"""`litft download ORG/NAME`: a checkpoint from the Hugging Face Hub into `checkpoints/ORG/NAME/`.

Only what fine-tuning needs is fetched: the weights (safetensors when the repository has them, else PyTorch
`.bin`), config, generation config, tokenizer and chat template files, and the license. `huggingface_hub` does
the transfer: parallel downloads with a progress bar, each file written under a temporary name and renamed when
complete, and an interrupted download resumed where it stopped when the command is run again.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from jsonargparse.typing import SecretStr

from litft.checkpoint import TOKENIZER_FILES
from litft.errors import CheckpointError, ConfigError

METADATA_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", *TOKENIZER_FILES}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a repository to download: metadata plus one format of weights, safetensors preferred.
    Files in subfolders (original/ consolidated checkpoints, ONNX exports...) are never needed."""
    top_level = [f for f in repo_files if "/" not in f]
    weights: list[str] = []
    for suffix, index in ((".safetensors", "model.safetensors.index.json"), (".bin", "pytorch_model.bin.index.json")):
        candidates = [f for f in top_level if f.endswith(suffix)]
        if suffix == ".bin":
            candidates = [f for f in candidates if f.startswith("pytorch_model")]
        # Some repositories ship a second copy in another layout (Mistral's consolidated.safetensors).
        transformers_layout = [f for f in candidates if f.startswith(("model", "pytorch_model"))]
        weights = transformers_layout or candidates
        if weights:
            break
    if not weights:
        return []
    extras = [f for f in top_level if f in METADATA_FILES or f.upper().startswith(("LICENSE", "README", "NOTICE"))]
    return sorted({*weights, *extras})


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def download(
    repo_id: str,
    checkpoint_dir: Path = Path("checkpoints"),
    revision: str | None = None,
    access_token: SecretStr | None = None,
) -> None:
    """Download a model from the Hugging Face Hub into CHECKPOINT_DIR/ORG/NAME.

    Args:
        repo_id: The repository, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.
        checkpoint_dir: The folder that holds downloaded checkpoints.
        revision: A branch, tag or commit of the repository (default: main).
        access_token: A Hugging Face token for gated or private models (default: the HF_TOKEN environment
            variable, or the token saved by `hf auth login`). It is never written to disk or printed.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # A SecretStr prints as asterisks (--print_config, logs); a caller from Python may pass a plain string.
    access_token = access_token.get_secret_value() if isinstance(access_token, SecretStr) else access_token
    if not REPO_ID.match(repo_id):
        raise ConfigError(f"REPO_ID {repo_id!r}: expected ORG/NAME as on huggingface.co, e.g. Qwen/Qwen2.5-0.5B")
    target = Path(checkpoint_dir) / repo_id
    try:
        info = HfApi().model_info(repo_id, revision=revision, token=access_token)
        files = select_files([sibling.rfilename for sibling in info.siblings or []])
        if not files:
            raise CheckpointError(
                f"{repo_id}: the repository has no safetensors or PyTorch .bin weights to fine-tune (GGUF, ONNX "
                "and other formats are not supported)"
            )
        print(f"Downloading {len(files)} files of {repo_id} into {target}", file=sys.stderr)
        snapshot_download(
            repo_id, revision=info.sha, local_dir=target, allow_patterns=files, token=access_token
        )
    except GatedRepoError:
        raise ConfigError(
            f"{repo_id}: the repository is gated; accept its terms on https://huggingface.co/{repo_id} and pass "
            "--access_token (or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"--revision {revision}: no such branch, tag or commit in {repo_id}") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{repo_id}: no such model repository, or it is private (check the name; for a private one pass "
            "--access_token or set HF_TOKEN)"
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        # Server errors and cut transfers; the message never includes the token.
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise CheckpointError(f"{repo_id}: HF_HUB_OFFLINE is set, which switches downloads off; unset it to "
                                  "download") from None
        raise CheckpointError(f"{repo_id}: download failed ({_first_line(error)}); run the command again to "
                              "resume") from None
    except Exception as error:
        # huggingface_hub's HTTP client raises its own connection errors (no network, DNS, refused).
        if type(error).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
            raise
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise CheckpointError(f"{repo_id}: cannot reach {endpoint} ({_first_line(error)}); check the network "
                              "connection (or HF_ENDPOINT)") from None
    print(str(target), file=sys.stderr)
