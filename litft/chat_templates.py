"""Chat templates: turning a list of messages into the one string a model was (or will be) trained on.

A checkpoint's own Jinja template is rendered exactly as Hugging Face's `apply_chat_template` renders it: a
sandboxed Jinja environment with `trim_blocks` / `lstrip_blocks`, the same globals (`raise_exception`,
`strftime_now`, `namespace`, `dict`), HF's `tojson` filter, the `{% generation %}` tag, and the tokenizer's named
special tokens as variables. Checkpoints without one use a built-in template; the built-ins end every assistant
turn with the EOS or end-of-turn token so that the model learns to stop.

The template a fine-tuning run used is saved next to its output (`chat_template.jinja` plus
`litft_template.json`), so that `litft generate --chat` on that output formats prompts the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from litft.checkpoint import atomic_write_text
from litft.errors import ConfigError, DataError
from litft.tokenizer import Tokenizer

LITFT_TEMPLATE_FILE = "litft_template.json"
TEMPLATE_FILE = "chat_template.jinja"

_ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set preamble = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set preamble = 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{{ preamble + '\\n\\n' }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}"
    "{{ raise_exception('the alpaca template takes a system message only as the first message') }}"
    "{% else %}"
    "{{ raise_exception('the alpaca template supports system, user and assistant roles, not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
)
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta's Llama 3 Instruct template.
_LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# For base models: the messages' text one after another, each assistant turn closed by EOS.
_PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"alpaca": _ALPACA, "chatml": _CHATML, "llama3": _LLAMA3, "plain": _PLAIN}
# Tokens a built-in template closes assistant turns with (besides EOS); generation stops at them too.
_END_OF_TURN = {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"]}
# Tokens that must be single vocabulary entries for a built-in template to make sense.
_REQUIRED_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"], "llama3": ["<|start_header_id|>", "<|eot_id|>"]}
# Message fields Hugging Face copies a message's reasoning into, so that any template finds it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _compile(source: str, where: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for HF's assistant mask; it renders as
        its body, which is all a template's text needs."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    class TemplateDict:
        # Only the constructor and fromkeys: no attribute access that could reach Python internals.
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters; Hugging Face's does not.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace
    )
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ConfigError(f"{where}: invalid Jinja chat template (line {error.lineno}: {error.message})") from None


def _plain_data(value: Any) -> Any:
    """A copy built only of JSON types, so the template can neither see rich objects nor modify the caller's."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    # Subclasses (enums, numpy scalars) are stripped back to the base type and its methods.
    if isinstance(value, str):
        return str.__str__(value)
    for plain_type in (bool, int, float):
        if isinstance(value, plain_type):
            return plain_type(value)
    return str(value)


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@dataclass
class ChatTemplate:
    """A Jinja chat template plus the special-token variables it is rendered with."""

    name: str
    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    # Tokens (besides the tokenizer's EOS) that end an assistant turn under this template.
    stop_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._compiled = _compile(self.source, f"chat template {self.name!r}")

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **extra: Any) -> str:
        """The conversation as one string, as Hugging Face's `apply_chat_template(tokenize=False)` renders it.
        `extra` become template variables (`tools`, `documents`, `enable_thinking`, ...)."""
        import jinja2

        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise DataError(f"message {index}: expected an object with `role` and `content`, got {message!r}")
        variables = {"tools": None, "documents": None, **self.special_tokens, **_plain_data(extra)}
        chat = [_alias_reasoning(m) for m in _plain_data(list(messages))]
        try:
            return self._compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as error:
            raise DataError(f"chat template {self.name!r} rejected the conversation: {error}") from None
        except Exception as error:  # noqa: BLE001 - the template's own code failed (e.g. text + number): the user's
            raise DataError(f"chat template {self.name!r} failed on the conversation: {type(error).__name__}: "
                            f"{error}; fix the template") from None


def _builtin(name: str, tokenizer: Tokenizer, flag: str = "--chat_template") -> ChatTemplate:
    missing = [t for t in _REQUIRED_TOKENS.get(name, []) if tokenizer.token_to_id(t) is None]
    if missing:
        raise ConfigError(
            f"{flag} {name}: the tokenizer of {tokenizer.checkpoint_dir} has no {', '.join(missing)} "
            "token; use alpaca or plain, or a .jinja file"
        )
    if tokenizer.eos_token is None:
        raise ConfigError(
            f"{flag} {name}: the tokenizer of {tokenizer.checkpoint_dir} has no EOS token to end assistant "
            "turns with; set `eos_token` in its tokenizer_config.json"
        )
    return ChatTemplate(name, BUILTIN_TEMPLATES[name], tokenizer.special_tokens(), list(_END_OF_TURN.get(name, [])))


def _saved_template(tokenizer: Tokenizer, folder: Path) -> ChatTemplate | None:
    record = folder / LITFT_TEMPLATE_FILE
    source = folder / TEMPLATE_FILE
    if not (record.is_file() and source.is_file()):
        return None
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{record}: not valid JSON ({error}); delete it to fall back to the checkpoint's template") from None
    return ChatTemplate(
        str(saved.get("name", "checkpoint")),
        source.read_text(encoding="utf-8"),
        tokenizer.special_tokens(),
        [str(t) for t in saved.get("stop_tokens", [])],
    )


def resolve_chat_template(
    tokenizer: Tokenizer,
    name: str | None = "auto",
    checkpoint_dir: str | Path | None = None,
    flag: str = "--chat_template",
) -> ChatTemplate:
    """Picks the chat template.

    `name`: "auto" (or None) = the template litft saved with a fine-tuned output in `checkpoint_dir` (default: the
    tokenizer's folder), else the checkpoint's own, else "chatml" if the vocabulary has <|im_start|>, else
    "plain"; "checkpoint" = the checkpoint's own; a built-in name; or the path of a .jinja file. `flag` is the
    command-line flag the name came from, for the error messages."""
    name = name or "auto"
    if name == "auto":
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else tokenizer.checkpoint_dir
        saved = _saved_template(tokenizer, folder)
        if saved is not None:
            return saved
        if tokenizer.chat_template is not None:
            return ChatTemplate("checkpoint", tokenizer.chat_template, tokenizer.special_tokens())
        has_chatml = all(tokenizer.token_to_id(t) is not None for t in _REQUIRED_TOKENS["chatml"])
        return _builtin("chatml" if has_chatml else "plain", tokenizer, flag)
    if name == "checkpoint":
        if tokenizer.chat_template is None:
            raise ConfigError(
                f"{flag} checkpoint: {tokenizer.checkpoint_dir} has no chat template; pick one of "
                f"{', '.join(BUILTIN_TEMPLATES)} or a .jinja file"
            )
        return ChatTemplate("checkpoint", tokenizer.chat_template, tokenizer.special_tokens())
    if name in BUILTIN_TEMPLATES:
        return _builtin(name, tokenizer, flag)
    path = Path(name)
    if path.suffix == ".jinja" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{flag} {name}: no such file")
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{flag} {name}: not UTF-8 text (byte {error.start}); save the template as UTF-8"
            ) from None
        return ChatTemplate(path.name, source, tokenizer.special_tokens())
    raise ConfigError(
        f"{flag} {name!r}: unknown; use auto, checkpoint, {', '.join(BUILTIN_TEMPLATES)} or a .jinja file path"
    )


def save_chat_template(template: ChatTemplate, out_dir: str | Path) -> None:
    """Records the template with a fine-tuned output, so generation later formats prompts identically."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / TEMPLATE_FILE, template.source)
    record = {"name": template.name, "stop_tokens": template.stop_tokens}
    atomic_write_text(out_dir / LITFT_TEMPLATE_FILE, json.dumps(record, indent=2) + "\n")
