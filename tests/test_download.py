"""`litft download` against a local stand-in of the Hugging Face Hub HTTP API, so the real huggingface_hub client
code runs end to end: listing, file transfer, resume after a cut connection, and the error answers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import concurrently

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_secret_token_for_tests"


class FakeHub:
    """Serves repositories {repo_id: {file name: bytes}}; `gated` repositories need the TOKEN. The first GET of a
    file named in `cut_once` stops 1 MB short of its end and drops the connection."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: set[str] = frozenset(), cut_once=()) -> None:
        self.repos, self.gated, self.cut_once = repos, set(gated), set(cut_once)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

            def do_GET(self) -> None:
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, handler, status: int, payload: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for key, value in {"Content-Length": str(len(payload)), **(headers or {})}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(payload)

    def error(self, handler, status: int, code: str, body: bool) -> None:
        payload = json.dumps({"error": code}).encode()
        self.reply(handler, status, payload, body, {"X-Error-Code": code, "Content-Type": "application/json"})

    def handle(self, handler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append((handler.command, path, dict(handler.headers)))
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/").lstrip("/").split("/")
        repo_id = "/".join(parts[:2])
        rest = parts[2:]
        if repo_id not in self.repos:
            return self.error(handler, 404, "RepoNotFound", body)
        if repo_id in self.gated and handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.error(handler, 403, "GatedRepo", body)
        files = self.repos[repo_id]
        if api and rest[:1] == ["tree"]:
            tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for n, d in files.items()]
            return self.reply(handler, 200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        if api:
            info = {"id": repo_id, "modelId": repo_id, "sha": SHA, "private": False,
                    "siblings": [{"rfilename": name} for name in files]}
            return self.reply(handler, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        # /{org}/{name}/resolve/{revision}/{file}
        name = "/".join(rest[2:])
        if rest[:1] != ["resolve"] or name not in files:
            return self.error(handler, 404, "EntryNotFound", body)
        data = files[name]
        headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        range_header = handler.headers.get("Range")
        if range_header and body:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self.reply(handler, 206, data[start:], body, headers)
        if body and name in self.cut_once:
            self.cut_once.discard(name)
            handler.send_response(200)
            for key, value in {"Content-Length": str(len(data)), **headers}.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data[: len(data) - 2**20])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        return self.reply(handler, 200, data, body, headers)

    def close(self) -> None:
        self.server.shutdown()


def stories_repo(stories_dir: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in stories_dir.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"a pickled copy that must not be fetched when safetensors exist"
    files["original/params.json"] = b"{}"
    return files


def run_download(hub: FakeHub, *args: str, token_env: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(Path(args[-1]) / ".hf")}
    env.pop("HF_TOKEN", None)
    if token_env is not None:
        env["HF_TOKEN"] = token_env
    return subprocess.run(
        [sys.executable, "-m", "litft", "download", *args], capture_output=True, text=True, timeout=120, env=env,
        cwd=ROOT,
    )


# huggingface_hub writes in 10 MB chunks: a transfer cut after 11 MB has something on disk to resume from.
BIG_WEIGHTS = os.urandom(12 * 2**20)


def make_hub(stories_dir: Path) -> FakeHub:
    return FakeHub({"tiny/stories": stories_repo(stories_dir), "tiny/gated": stories_repo(stories_dir),
                    "tiny/big": {"model.safetensors": BIG_WEIGHTS, "config.json": b"{}"},
                    "tiny/gguf-only": {"model.gguf": b"gguf", "config.json": b"{}"}},
                   gated={"tiny/gated"}, cut_once={"model.safetensors"})


@pytest.fixture
def hub(stories_dir):
    hub = make_hub(stories_dir)
    yield hub
    hub.close()


def test_download_selects_files_and_skips_what_it_has(hub, stories_dir, tmp_path):
    from litft.checkpoint import load_model
    from litft.tokenizer import Tokenizer

    hub.cut_once.clear()
    result = run_download(hub, "tiny/stories", "--checkpoint_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    target = tmp_path / "tiny" / "stories"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "LICENSE"):
        assert (target / name).read_bytes() == (stories_dir / name).read_bytes()
    assert not (target / "pytorch_model.bin").exists() and not (target / "original").exists()
    Tokenizer.from_checkpoint(target)
    load_model(target)
    # A second run finds every file complete and transfers nothing again.
    hub.requests.clear()
    result = run_download(hub, "tiny/stories", "--checkpoint_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]


def test_cut_transfer_resumes_where_it_stopped(hub, tmp_path):
    result = run_download(hub, "tiny/big", "--checkpoint_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "big" / "model.safetensors").read_bytes() == BIG_WEIGHTS
    weight_gets = [h for method, path, h in hub.requests if method == "GET" and path.endswith("/model.safetensors")]
    assert len(weight_gets) == 2
    # The second request asks only for what the cut first one did not deliver.
    assert weight_gets[1]["Range"] == f"bytes={10 * 2**20}-"


def test_gated_repository_needs_the_token_and_never_stores_it(hub, tmp_path):
    without_token, env_token, flag_token = concurrently(
        partial(run_download, hub, "tiny/gated", "--checkpoint_dir", str(tmp_path)),
        partial(run_download, hub, "tiny/gated", "--checkpoint_dir", str(tmp_path), token_env=TOKEN),
        partial(run_download, hub, "tiny/gated", "--access_token", TOKEN, "--checkpoint_dir", str(tmp_path / "again")),
        workers=3,
    )
    assert without_token.returncode != 0
    assert without_token.stderr.strip().splitlines()[-1].startswith("litft: error: tiny/gated: the repository is gated")
    assert env_token.returncode == 0, env_token.stderr
    assert flag_token.returncode == 0, flag_token.stderr
    assert TOKEN not in flag_token.stdout + flag_token.stderr
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file


BAD_REPOSITORIES = {
    "tiny/missing": "no such model repository",
    "tiny/gguf-only": "no safetensors or PyTorch .bin weights",
    "not a repo id": "expected ORG/NAME",
}


@pytest.fixture(scope="module")
def bad_repository_downloads(stories_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`litft download` of each of BAD_REPOSITORIES, each into its own folder, the three at once."""
    hub = make_hub(stories_dir)
    try:
        results = concurrently(*(
            partial(run_download, hub, repo_id, "--checkpoint_dir", str(tmp_path_factory.mktemp("bad")))
            for repo_id in BAD_REPOSITORIES
        ), workers=len(BAD_REPOSITORIES))
    finally:
        hub.close()
    return dict(zip(BAD_REPOSITORIES, results))


@pytest.mark.parametrize(("repo_id", "message"), list(BAD_REPOSITORIES.items()))
def test_bad_repositories_are_one_clear_line(bad_repository_downloads, repo_id, message):
    result = bad_repository_downloads[repo_id]
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("litft: error:") and message in last
    assert "Traceback" not in result.stderr


def test_file_selection_prefers_safetensors_in_transformers_layout():
    from litft.commands.download import select_files

    files = ["consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "pytorch_model.bin", "config.json", "tokenizer.model", "README.md",
             "original/tokenizer.model", "params.json"]
    assert select_files(files) == sorted([
        "README.md", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.model",
    ])
    assert select_files(["pytorch_model.bin", "config.json", "training_args.bin"]) == ["config.json", "pytorch_model.bin"]
    assert select_files(["model.gguf", "config.json"]) == []


def test_an_unreachable_hub_or_offline_mode_is_one_line(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / ".hf")}
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "litft", "download", "tiny/stories", "--checkpoint_dir", str(tmp_path)]
    cases = (({}, "tiny/stories: cannot reach http://127.0.0.1:9"),
             ({"HF_HUB_OFFLINE": "1"}, "tiny/stories: HF_HUB_OFFLINE is set"))
    results = concurrently(*(
        partial(subprocess.run, command, capture_output=True, text=True, timeout=120, env={**env, **extra}, cwd=ROOT)
        for extra, _ in cases
    ))
    for (_, message), result in zip(cases, results):
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"litft: error: {message}")


def test_print_config_masks_the_token(capsys):
    from litft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["download", "tiny/stories", "--access_token", TOKEN, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "access_token: '**********'" in printed and TOKEN not in printed
