import re
import subprocess
import sys

import pytest


def run_litft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litft", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand():
    result = run_litft("--help")
    assert result.returncode == 0
    for name in ("download", "finetune", "merge", "generate"):
        assert name in result.stdout
    result = run_litft("finetune", "--help")
    for name in ("lora", "qlora", "full"):
        assert name in result.stdout


def test_help_names_path_flags_types_as_written(capsys):
    """jsonargparse prints pathlib's class as `<class 'Path'>`; the help says `Path`."""
    from litft.cli import main

    for command in (["download"], ["finetune", "lora"], ["merge"]):
        with pytest.raises(SystemExit) as exit:
            main([*command, "--help"])
        assert exit.value.code == 0
        output = capsys.readouterr().out
        assert "<class" not in output, command
        assert re.search(r"type:\s+Path", output), command  # the help wraps at any space


BAD_COMMAND_LINES = [
    (["data", "preview", "--data.max_seq_length", "abc"],
     "--data.max_seq_length abc: expected int; see `litft data preview --help`"),
    (["finetune", "lora", "--train.micro_batch_size", "abc"],
     "--train.micro_batch_size abc: expected int or 'auto'; see `litft finetune lora --help`"),
    (["finetune", "lora", "--nope", "1"], "unrecognized arguments: --nope 1; see `litft finetune lora --help`"),
    (["finetune", "lora", "--config", "{dir}/typo.yaml"],
     "--config {dir}/typo.yaml: unknown option train.lrr; see `litft finetune lora --help`"),
    (["finetune", "lora", "--config", "{dir}/top.yaml"], "--config {dir}/top.yaml: unknown option chekpoint"),
    (["finetune", "lora", "--config", "{dir}/broken.yaml"],
     "--config {dir}/broken.yaml: not valid YAML (while parsing"),
    (["generate", "--config", "{dir}/empty.yaml"], "--config {dir}/empty.yaml: expected a YAML mapping of flags"),
]


def test_flags_and_config_files_jsonargparse_refuses_give_one_line(tmp_path, capsys):
    """jsonargparse's own refusals (a value of the wrong type, an unknown flag, an unknown key or bad YAML in a
    --config file: it reported the last as "error: 'finetune'") end in one line naming the flag or key, exit 2."""
    import pytest

    from litft.cli import main

    (tmp_path / "typo.yaml").write_text("checkpoint: x\ntrain:\n  lrr: 1\n")
    (tmp_path / "top.yaml").write_text("chekpoint: x\n")
    (tmp_path / "broken.yaml").write_text("train:\n  lr: [1\n")
    (tmp_path / "empty.yaml").write_text("")
    for argv, expected in BAD_COMMAND_LINES:
        with pytest.raises(SystemExit) as exit_info:
            main([word.format(dir=tmp_path) for word in argv])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("litft: error: " + expected.format(dir=tmp_path)), lines
        assert "usage:" not in captured.out + captured.err
