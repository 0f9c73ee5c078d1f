"""The `litft` command line: subcommand name -> recipe function.

Each subcommand is a plain function in `litft/commands/`; jsonargparse turns its signature into flags and its
docstring into the help text, and gives every subcommand `--config FILE.yaml` and `--print_config`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from litft.errors import LitftError, NotBuiltError

# (subcommand path, "module:function"): a path of two names is a nested subcommand (`litft finetune lora`).
COMMANDS: list[tuple[tuple[str, ...], str]] = [
    (("download",), "litft.commands.download:download"),
    (("finetune", "lora"), "litft.commands.finetune:lora"),
    (("finetune", "qlora"), "litft.commands.finetune:qlora"),
    (("finetune", "full"), "litft.commands.finetune:full"),
    (("finetune", "dpo"), "litft.commands.preference:dpo"),
    (("finetune", "orpo"), "litft.commands.preference:orpo"),
    (("finetune", "simpo"), "litft.commands.preference:simpo"),
    (("merge",), "litft.commands.merge:merge"),
    (("generate",), "litft.commands.generate:generate"),
    (("chat",), "litft.commands.generate:chat"),
    (("data", "preview"), "litft.commands.data:preview"),
    (("slurm",), "litft.commands.slurm:slurm"),
]
GROUP_HELP = {
    "finetune": "Fine-tune a model: lora, qlora, full, or preference alignment (dpo, orpo, simpo).",
    "data": "Inspect a dataset as the model will see it.",
}


def _not_built(name: str) -> Callable[[], None]:
    def recipe() -> None:
        raise NotBuiltError(f"`litft {name}` is not built yet")

    recipe.__doc__ = f"(not built yet) `litft {name}`."
    recipe.__name__ = name.replace(" ", "_")
    return recipe


def _resolve(path: tuple[str, ...], target: str) -> Callable[..., Any]:
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("litft"):
            return _not_built(" ".join(path))
        raise
    return getattr(module, function_name, None) or _not_built(" ".join(path))


def components() -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, target in COMMANDS:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {"_help": GROUP_HELP.get(name, "")})
        node[path[-1]] = _resolve(path, target)
    return tree


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    from litft.commands.slurm import slurm_passthrough

    argv = slurm_passthrough(sys.argv[1:] if argv is None else argv)
    try:
        CLI(components(), args=argv, prog="litft", description="Fine-tune open LLMs on Lightning Fabric.")
    except LitftError as error:
        print(f"litft: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("litft: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
