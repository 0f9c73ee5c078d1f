"""Dataset formats: each record becomes a list of chat messages (or raw text) in one shape.

| format              | fields                                                                           |
|---------------------|----------------------------------------------------------------------------------|
| `alpaca`            | `instruction`, optional `input`, `output` (optional `system`)                    |
| `sharegpt`          | `conversations: [{"from": "system"/"human"/"gpt" (or user/assistant), "value"}]` |
| `messages`          | `messages: [{"role": "system"/"user"/"assistant", "content"}]`                   |
| `prompt_completion` | `prompt`, `completion` (strings, or message lists)                               |
| `text`              | `text` (continued pre-training)                                                  |
| `preference`        | `prompt`, `chosen`, `rejected` (strings, or message lists)                       |

Alpaca and prompt/completion records become a user message and an assistant message, so every instruction format
goes through the same chat template. Field names in the files can differ from these: `FieldNames` maps each name
above to the one the file uses (`--data.fields '{"instruction": "question"}'`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litft.errors import DataError

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference")
CANONICAL_FIELDS = (
    "instruction", "input", "output", "system", "conversations", "from", "value", "messages", "role", "content",
    "prompt", "completion", "text", "chosen", "rejected",
)
# Both chat formats accept both spellings of the roles.
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class PreferencePair:
    """A preference record: the shared prompt messages and the two competing continuations."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


class FieldNames:
    """Maps the canonical field names above to the names a dataset's files use."""

    def __init__(self, remap: dict[str, str] | None = None) -> None:
        remap = dict(remap or {})
        unknown = sorted(set(remap) - set(CANONICAL_FIELDS))
        if unknown:
            raise DataError(
                f"--data.fields: unknown field name(s) {', '.join(unknown)}; the names to remap are "
                f"{', '.join(CANONICAL_FIELDS)}"
            )
        self.remap = remap

    def __getitem__(self, canonical: str) -> str:
        return self.remap.get(canonical, canonical)


def detect_format(record: dict[str, Any], fields: FieldNames, location: str) -> str:
    """Names the format whose fields the record has; DataError when none matches."""
    present = set(record)
    if fields["conversations"] in present:
        return "sharegpt"
    if fields["messages"] in present:
        return "messages"
    if {fields["chosen"], fields["rejected"]} <= present:
        return "preference"
    if {fields["instruction"], fields["output"]} <= present:
        return "alpaca"
    if {fields["prompt"], fields["completion"]} <= present:
        return "prompt_completion"
    if fields["text"] in present:
        return "text"
    raise DataError(
        f"{location}: cannot detect the dataset format from the fields {sorted(present)}; pass --data.format "
        f"({', '.join(FORMATS[1:])}) and, if the names differ, --data.fields"
    )


def record_to_messages(record: dict[str, Any], format: str, fields: FieldNames, location: str) -> list[Message]:
    """The conversation a chat or instruction record holds, validated: it has at least one assistant turn."""
    if format == "alpaca":
        instruction = _text_field(record, fields["instruction"], location)
        extra_input = _text_field(record, fields["input"], location, required=False)
        output = _text_field(record, fields["output"], location)
        system = _text_field(record, fields["system"], location, required=False)
        user = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if format == "prompt_completion":
        prompt = _turns(record, fields["prompt"], fields, location, default_role="user")
        completion = _turns(record, fields["completion"], fields, location, default_role="assistant")
        messages = prompt + completion
    elif format == "sharegpt":
        messages = _message_list(record, fields["conversations"], fields["from"], fields["value"], location)
    elif format == "messages":
        messages = _message_list(record, fields["messages"], fields["role"], fields["content"], location)
    else:
        raise ValueError(f"not a chat format: {format}")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{location}: the conversation has no assistant turn, so nothing would be trained; "
                        f"add one or remove the record")
    return messages


def record_to_text(record: dict[str, Any], fields: FieldNames, location: str) -> str:
    return _text_field(record, fields["text"], location)


def record_to_preference(record: dict[str, Any], fields: FieldNames, location: str) -> PreferencePair:
    """Prompt, chosen and rejected messages. Without a `prompt` field, chosen and rejected must be full
    conversations; their shared leading messages become the prompt."""
    for name in ("chosen", "rejected"):
        if fields[name] not in record:
            raise DataError(f"{location}: missing field `{fields[name]}` (preference data needs prompt, chosen, "
                            f"rejected; remap names with --data.fields)")
    chosen = _turns(record, fields["chosen"], fields, location, default_role="assistant")
    rejected = _turns(record, fields["rejected"], fields, location, default_role="assistant")
    if fields["prompt"] in record:
        prompt = _turns(record, fields["prompt"], fields, location, default_role="user")
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if chosen == rejected:
        raise DataError(f"{location}: `{fields['chosen']}` and `{fields['rejected']}` are identical, so the pair "
                        f"teaches nothing; remove the record")
    if not prompt:
        raise DataError(f"{location}: missing field `{fields['prompt']}` (or a shared first message in chosen and "
                        f"rejected)")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(f"{location}: `{fields[name]}` must end with an assistant message")
    return PreferencePair(prompt, chosen, rejected)


def _turns(record: dict[str, Any], field: str, fields: FieldNames, location: str, default_role: str) -> list[Message]:
    """A field that is either a string (one message of `default_role`) or a list of role/content messages."""
    if isinstance(record.get(field), list):
        return _message_list(record, field, fields["role"], fields["content"], location)
    return [{"role": default_role, "content": _text_field(record, field, location)}]


def _message_list(record: dict[str, Any], field: str, role_key: str, content_key: str,
                  location: str) -> list[Message]:
    turns = record.get(field)
    if turns is None:
        raise DataError(f"{location}: field `{field}` is null; give it a list of messages or remove the record"
                        if field in record else f"{location}: missing field `{field}`")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{location}: `{field}` must be a non-empty list of messages, got {_describe(turns)}")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{location}: `{field}[{index}]`"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object with `{role_key}` and `{content_key}`, got {_describe(turn)}")
        role = turn.get(role_key)
        if role not in ROLES:
            raise DataError(f"{where}: unknown {role_key} {role!r}; use one of {', '.join(ROLES)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{where}: `{content_key}` must be text, got {_describe(content)}")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def _text_field(record: dict[str, Any], field: str, location: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None:
        if required and field in record:
            raise DataError(f"{location}: field `{field}` is null; give it text or remove the record")
        if required:
            raise DataError(f"{location}: missing field `{field}` (remap names with --data.fields, or pass "
                            f"--data.format)")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{location}: field `{field}` must be text, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
