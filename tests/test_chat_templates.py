"""Chat templates rendered by litft equal transformers' `apply_chat_template(tokenize=False)` for real tokenizers
and real model templates; built-in templates close every assistant turn so it can be trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from litft.chat_templates import BUILTIN_TEMPLATES, ChatTemplate, resolve_chat_template, save_chat_template
from litft.errors import ConfigError, DataError
from litft.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "  Name a colour.  "},
        {"role": "assistant", "content": "Blue — like the sea 🌊."},
        {"role": "user", "content": "Another?\nPlease."},
    ],
    [
        SYSTEM,
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ],
]
# (folder under tests/data/tokenizers or None for stories260K, the tokenizer_config.json written beside it)
TOKENIZERS = {
    "stories260K": (None, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "gpt2": ("gpt2", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}),
    "mistral-sentencepiece": ("mistral-7b-v0.1", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
}


def tokenizer_folder(root: Path, name: str, data_dir: Path, stories_dir: Path, chat_template: str | None) -> Path:
    source_name, config = TOKENIZERS[name]
    source = stories_dir if source_name is None else data_dir / "tokenizers" / source_name
    folder = root / name
    folder.mkdir()
    for file in source.iterdir():
        if file.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
            shutil.copy(file, folder / file.name)
    config = {**config, "chat_template": chat_template} if chat_template else config
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def render_both(reference, template: ChatTemplate, messages: list[dict], generation_prompt: bool, **extra):
    """(transformers' rendering, litft's); an exception from either side is returned in its place."""
    import jinja2

    results = []
    for render in (
        lambda: reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
        ),
        lambda: template.render(messages, add_generation_prompt=generation_prompt, **extra),
    ):
        try:
            results.append(render())
        except (jinja2.exceptions.TemplateError, DataError) as error:
            results.append(error)
    return results


@pytest.mark.parametrize("tokenizer_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("template_file", sorted(p.name for p in TEMPLATES.glob("*.jinja")))
def test_checkpoint_templates_render_like_transformers(tmp_path, data_dir, stories_dir, tokenizer_name, template_file):
    from transformers import AutoTokenizer

    source = (TEMPLATES / template_file).read_text()
    folder = tokenizer_folder(tmp_path, tokenizer_name, data_dir, stories_dir, source)
    reference = AutoTokenizer.from_pretrained(folder)
    template = resolve_chat_template(Tokenizer.from_checkpoint(folder))
    assert (template.name, template.source) == ("checkpoint", source)
    rendered_somewhere = False
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected, ours = render_both(reference, template, messages, generation_prompt)
            if isinstance(expected, Exception):
                assert isinstance(ours, DataError) and str(expected) in str(ours)
            else:
                assert ours == expected, (messages, generation_prompt)
                rendered_somewhere = True
    assert rendered_somewhere


def test_indented_block_tags_are_stripped_like_transformers(tmp_path, data_dir, stories_dir):
    """trim_blocks and lstrip_blocks: indentation before a block tag and the newline after it are not output."""
    from transformers import AutoTokenizer

    source = (
        "{# a comment #}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'user' %}\n"
        "        User: {{ message['content'] }}\n"
        "    {% else %}\n"
        "        Bot: {{ message['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}Bot:{% endif %}"
    )
    folder = tokenizer_folder(tmp_path, "stories260K", data_dir, stories_dir, source)
    reference = AutoTokenizer.from_pretrained(folder)
    template = resolve_chat_template(Tokenizer.from_checkpoint(folder))
    expected, ours = render_both(reference, template, CONVERSATIONS[2], True)
    assert ours == expected == "        User:   Name a colour.  \n        Bot: Blue — like the sea 🌊.</s>\n" \
        "        User: Another?\nPlease.\nBot:"


def test_tools_and_tool_calls_render_like_transformers(tmp_path, data_dir, stories_dir):
    from transformers import AutoTokenizer

    folder = tokenizer_folder(tmp_path, "stories260K", data_dir, stories_dir, (TEMPLATES / "qwen2.5.jinja").read_text())
    reference = AutoTokenizer.from_pretrained(folder)
    template = resolve_chat_template(Tokenizer.from_checkpoint(folder))
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather", "description": "Weather in a city, «now».",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
        ]},
        {"role": "tool", "content": "{\"temp\": 21}"},
    ]
    expected, ours = render_both(reference, template, messages, True, tools=tools)
    assert ours == expected and "Zürich" in ours and "<tool_call>" in ours


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_close_assistant_turns_and_grow_by_prefix(name, stories_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(name, tokenizer.eos_token)
    template = ChatTemplate(name, BUILTIN_TEMPLATES[name], tokenizer.special_tokens())
    conversation = CONVERSATIONS[3]
    text = template.render(conversation)
    assert text == reference.apply_chat_template(conversation, tokenize=False, chat_template=template.source)
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        assert message["content"] + end_of_turn in text
        # What the data pipeline relies on: the prompt up to a reply is a prefix of the text with that reply.
        prompt = template.render(conversation[:i], add_generation_prompt=True)
        with_reply = template.render(conversation[: i + 1])
        assert with_reply.startswith(prompt)
        assert with_reply[len(prompt):].strip() in (message["content"] + end_of_turn, )
        assert text.startswith(with_reply)


def test_auto_picks_saved_then_checkpoint_then_chatml_or_plain(tmp_path, stories_dir):
    from tokenizers import Tokenizer as HFTokenizer

    stories = Tokenizer.from_checkpoint(stories_dir)
    assert resolve_chat_template(stories).name == "plain"
    with pytest.raises(ConfigError, match="<|im_start|>"):
        resolve_chat_template(stories, "chatml")
    # A vocabulary with ChatML tokens and no template of its own gets chatml, which also stops on <|im_end|>.
    folder = tmp_path / "chatml_vocab"
    folder.mkdir()
    backend = HFTokenizer.from_file(str(stories_dir / "tokenizer.json"))
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.save(str(folder / "tokenizer.json"))
    shutil.copy(stories_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
    chatml = resolve_chat_template(Tokenizer.from_checkpoint(folder))
    assert (chatml.name, chatml.stop_tokens) == ("chatml", ["<|im_end|>"])
    # A fine-tuned output records its template; generation on that output finds it again.
    out = tmp_path / "out"
    save_chat_template(chatml, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, out / name)
    again = resolve_chat_template(Tokenizer.from_checkpoint(out))
    assert (again.name, again.source, again.stop_tokens) == ("chatml", chatml.source, ["<|im_end|>"])


def test_template_files_names_and_errors(tmp_path, stories_dir):
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    from_file = resolve_chat_template(tokenizer, str(TEMPLATES / "zephyr-7b-beta.jinja"))
    assert from_file.render([{"role": "user", "content": "x"}], add_generation_prompt=True) == (
        "<|user|>\nx</s>\n<|assistant|>\n"
    )
    assert resolve_chat_template(tokenizer, "alpaca").render(CONVERSATIONS[0], add_generation_prompt=True).endswith(
        "### Instruction:\nHi!\n\n### Response:\n"
    )
    with pytest.raises(ConfigError, match="unknown"):
        resolve_chat_template(tokenizer, "vicuna")
    with pytest.raises(ConfigError, match="no such file"):
        resolve_chat_template(tokenizer, str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_chat_template(tokenizer, "checkpoint")
    with pytest.raises(ConfigError, match="invalid Jinja"):
        ChatTemplate("broken", "{% for m in messages %}")
    # The sandbox refuses to let a template modify its inputs.
    with pytest.raises(DataError, match="rejected"):
        ChatTemplate("sneaky", "{{ messages.append(1) }}").render([{"role": "user", "content": "x"}])
