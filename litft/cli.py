"""The `litft` command line: subcommand name -> recipe function.

Each subcommand is a plain function in `litft/commands/`; jsonargparse turns its signature into flags and its
docstring into the help text, and gives every subcommand `--config FILE.yaml` and `--print_config`.
"""

from __future__ import annotations

import importlib
import re
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


def help_formatter() -> type:
    """jsonargparse's help formatter with types named as a reader writes them: `(type: Path, ...)`, where
    jsonargparse prints pathlib's class as `<class 'Path'>`."""
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        def _get_type_str(self, action: Any) -> str | None:
            text = super()._get_type_str(action)
            return None if text is None else re.sub(r"<class '(\w+)'>", r"\1", text)

    return HelpFormatter


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, ArgumentError

    from litft.commands.slurm import slurm_passthrough

    argv = slurm_passthrough(sys.argv[1:] if argv is None else argv)
    try:
        CLI(components(), args=argv, prog="litft", description="Fine-tune open LLMs on Lightning Fabric.",
            exit_on_error=False, formatter_class=help_formatter())
    except ArgumentError as error:  # a flag or a --config file jsonargparse could not take
        print(f"litft: error: {parser_error_line(error, argv)}", file=sys.stderr)
        sys.exit(2)
    except LitftError as error:
        print(f"litft: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("litft: interrupted", file=sys.stderr)
        sys.exit(130)


def command_words(argv: list[str]) -> list[str]:
    """The subcommand path at the start of `argv` (["finetune", "lora"]), as far as it names one."""
    words: list[str] = []
    for word in argv:
        if not any(path[: len(words) + 1] == (*words, word) for path, _ in COMMANDS):
            break
        words.append(word)
    return words


def parser_error_line(error: Exception, argv: list[str]) -> str:
    """jsonargparse's message for a flag or config value it refused, in one line that names the flag and the value
    and points at the command's help, instead of its usage block and multi-line type report."""
    message = str(error)
    words = command_words(argv)
    hint = f"see `litft {' '.join(words)} --help`" if words else "see `litft --help`"
    typed = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if typed:
        key, detail = typed.groups()
        given = re.search(r"(?:Given value|Got value): (.*)", detail)
        expected = re.findall(r"Expected a (?:<class '(\w+)'>|typing\.Literal\[(.*?)\])", detail)
        expected = [name or literal for name, literal in expected if name != "NoneType"]
        if given and expected:
            return f"--{key} {given.group(1).strip()}: expected {' or '.join(expected)}; {hint}"
        return f"--{key}: {' '.join(detail.split())}; {hint}"
    last_config = (config_files(argv) or [""])[-1]
    if message.startswith("Problems parsing config"):
        where = " ".join(re.sub(r'in "<unicode string>",?', "", message.split(":", 1)[-1]).split())
        return f"--config {last_config}: not valid YAML ({where})"
    if message.startswith("Unexpected config"):  # an empty file, or YAML that is not a mapping of flags
        found = " ".join(message.partition(":")[2].split()) or "nothing"
        return (f"--config {last_config}: expected a YAML mapping of flags (e.g. `checkpoint: DIR`), "
                f"found {found[:60]}; {hint}")
    if re.fullmatch(r"'[\w-]+'", message):  # jsonargparse fails this way on an unknown key in a --config file
        unknown = unknown_config_keys(argv, words)
        if unknown:
            return f"{unknown}; {hint}, or `--print_config` for every accepted key"
        return f"an option of the --config file is not accepted here; {hint}"
    return f"{' '.join(message.split()).rstrip('.')}; {hint}"


def unknown_config_keys(argv: list[str], words: list[str]) -> str | None:
    """'--config FILE: unknown option train.lrr' for the first key of a --config file that the command's function
    does not take (its parameters, and the fields of those that are dataclasses), or None."""
    import dataclasses
    import inspect
    import typing

    import yaml

    target = next((target for path, target in COMMANDS if path == tuple(words)), None)
    if target is None:
        return None
    function = _resolve(tuple(words), target)
    parameters = inspect.signature(function).parameters
    hints = typing.get_type_hints(function)
    for file in config_files(argv):
        try:
            config = yaml.safe_load(open(file, encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None
        for key, value in config.items() if isinstance(config, dict) else ():
            if key not in parameters:
                return f"--config {file}: unknown option {key}"
            kind = hints.get(key)
            if dataclasses.is_dataclass(kind) and isinstance(value, dict):
                fields = {field.name for field in dataclasses.fields(kind)}
                extra = [name for name in value if name not in fields]
                if extra:
                    return f"--config {file}: unknown option {key}.{extra[0]}"
    return None


def config_files(argv: list[str]) -> list[str]:
    """The files given with --config FILE or --config=FILE, in order."""
    files = []
    for index, word in enumerate(argv):
        if word.startswith("--config="):
            files.append(word.partition("=")[2])
        elif word == "--config" and index + 1 < len(argv):
            files.append(argv[index + 1])
    return files


if __name__ == "__main__":
    main()
