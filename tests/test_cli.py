import subprocess
import sys


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
