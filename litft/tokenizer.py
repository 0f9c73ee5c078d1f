"""The tokenizer of a checkpoint folder.

Three on-disk formats are read, in this order of preference:
  - `tokenizer.json` (the `tokenizers` library: every modern Hugging Face checkpoint);
  - `vocab.json` + `merges.txt` (GPT-2 style byte-level BPE, rebuilt as a `tokenizers` pipeline);
  - `tokenizer.model` alone (sentencepiece, an optional extra: `pip install sentencepiece`).

Which tokens are special, which ids are BOS / EOS / padding and whether BOS is prepended come only from the
folder's files: `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json` and `config.json`.
The backends always encode without special tokens; BOS and EOS are added here, so the rule lives in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from litft.errors import CheckpointError

# The named special tokens Hugging Face passes to chat templates (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Backend(Protocol):
    vocab_size: int
    # Special ids the tokenizer file itself defines ("bos_token_id" -> id), the last fallback after the configs.
    own_special_ids: dict[str, int]

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str | None: ...


class _TokenizersBackend:
    """A `tokenizers.Tokenizer`, loaded from tokenizer.json or assembled from GPT-2 vocab/merges files."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.own_special_ids: dict[str, int] = {}

    @classmethod
    def from_json(cls, path: Path) -> "_TokenizersBackend":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as error:  # the Rust side raises a bare Exception for any malformed file
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({error})") from None

    @classmethod
    def from_vocab_and_merges(cls, vocab: Path, merges: Path, special_tokens: list[str]) -> "_TokenizersBackend":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors

        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as error:
            raise CheckpointError(f"{vocab.parent}: vocab.json / merges.txt could not be read ({error})") from None
        # The same byte-level pipeline Hugging Face builds for GPT-2 style files.
        tokenizer = HFTokenizer(bpe)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        if special_tokens:
            tokenizer.add_special_tokens(special_tokens)
        return cls(tokenizer)

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Marks tokens named special by the config files (already in the vocabulary) as unsplittable."""
        known = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in tokens if t not in known and self.tokenizer.token_to_id(t) is not None]
        if missing:
            self.tokenizer.add_special_tokens(missing)

    def bos_added_by_post_processor(self, bos_id: int | None) -> bool:
        if bos_id is None:
            return False
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.encode("a", add_special_tokens=True).ids
        return len(full) > len(plain) and full[0] == bos_id

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)


class _SentencePieceBackend:
    """A sentencepiece model. Special token strings in the text are split out first and each stretch between them
    is encoded on its own (as Hugging Face's slow Llama tokenizer does), so `<s>` in a template becomes one id."""

    def __init__(self, path: Path, special_tokens: list[str]) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise CheckpointError(
                f"{path.parent}: has only a sentencepiece tokenizer.model; install the optional extra with "
                "`pip install sentencepiece`"
            ) from None
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise CheckpointError(f"{path}: not a valid sentencepiece model ({error})") from None
        self.vocab_size = self.processor.vocab_size()
        own = {"bos_token_id": self.processor.bos_id(), "eos_token_id": self.processor.eos_id(),
               "pad_token_id": self.processor.pad_id()}
        self.own_special_ids = {key: token_id for key, token_id in own.items() if token_id >= 0}
        pieces = {self.processor.id_to_piece(i) for i in range(self.vocab_size) if self.processor.is_control(i)}
        # Longest first, so a token that contains another is matched whole.
        self.special = sorted({t for t in [*special_tokens, *pieces] if t}, key=len, reverse=True)
        self.special_ids = {self.processor.piece_to_id(t) for t in self.special} | {
            i for i in range(self.vocab_size) if self.processor.is_control(i) or self.processor.is_unknown(i)
        }

    def _split_special(self, text: str) -> list[tuple[int, int, bool]]:
        """(start, end, is_special) stretches of `text`."""
        parts: list[tuple[int, int, bool]] = []
        start = position = 0
        while position < len(text):
            match = next((t for t in self.special if text.startswith(t, position)), None)
            if match is None:
                position += 1
                continue
            if position > start:
                parts.append((start, position, False))
            parts.append((position, position + len(match), True))
            position = start = position + len(match)
        if start < len(text):
            parts.append((start, len(text), False))
        return parts

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end, is_special in self._split_special(text):
            if is_special:
                ids.append(self.processor.piece_to_id(text[start:end]))
                offsets.append((start, end))
                continue
            segment = text[start:end]
            # sentencepiece reports byte offsets into the segment; map them to character offsets in `text`.
            char_at_byte = [0] * (len(segment.encode("utf-8")) + 1)
            byte = 0
            for index, char in enumerate(segment):
                width = len(char.encode("utf-8"))
                for b in range(byte, byte + width):
                    char_at_byte[b] = index
                byte += width
                char_at_byte[byte] = index + 1
            for piece in self.processor.encode(segment, return_type="proto").pieces:
                ids.append(piece.id)
                offsets.append((start + char_at_byte[piece.begin], start + char_at_byte[piece.end]))
        return ids, offsets

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self.special_ids:
                if not skip_special_tokens:
                    text.append(self.processor.decode(run) + self.processor.id_to_piece(token_id))
                    run = []
                continue
            run.append(token_id)
        text.append(self.processor.decode(run))
        return "".join(text)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        # sentencepiece answers the unknown id for any piece it lacks.
        return token_id if token_id != self.processor.unk_id() or token == self.processor.id_to_piece(token_id) else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.processor.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config / special_tokens_map: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _read_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The checkpoint's default chat template: `chat_template.jinja`, else tokenizer_config's `chat_template`
    (a string, or a list of {name, template} where the one named "default" is used)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> ids for one checkpoint, with its special tokens and default chat template."""

    def __init__(self, backend: _Backend, checkpoint_dir: Path, settings: dict[str, Any]) -> None:
        self.backend = backend
        self.checkpoint_dir = checkpoint_dir
        self.vocab_size: int = backend.vocab_size
        self.bos_id: int | None = settings["bos_id"]
        self.eos_id: int | None = settings["eos_id"]
        self.pad_id: int | None = settings["pad_id"]
        self.bos_token: str | None = settings["bos_token"]
        self.eos_token: str | None = settings["eos_token"]
        self.stop_ids: list[int] = settings["stop_ids"]
        self.add_bos: bool = settings["add_bos"]
        self.chat_template: str | None = settings["chat_template"]
        self._special_tokens: dict[str, str] = settings["special_tokens"]

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "Tokenizer":
        folder = Path(checkpoint_dir)
        if not folder.is_dir():
            raise CheckpointError(f"--checkpoint {folder}: no such folder (download one with `litft download ORG/NAME`)")
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation_config = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")
        model_config = {**model_config.get("text_config", {}), **model_config}

        named: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_text(tokenizer_config.get(name)) or _token_text(special_map.get(name))
            if token is not None:
                named[name] = token
        extra = [
            *(tokenizer_config.get("additional_special_tokens") or []),
            *(special_map.get("additional_special_tokens") or []),
        ]
        decoder = tokenizer_config.get("added_tokens_decoder") or {}
        extra += [t for t in decoder.values() if isinstance(t, dict) and t.get("special")]
        special_strings = [*named.values(), *(t for t in map(_token_text, extra) if t)]

        backend = cls._load_backend(folder, special_strings)

        def lookup(name: str, id_key: str) -> tuple[str | None, int | None]:
            token = named.get(name)
            token_id = backend.token_to_id(token) if token is not None else None
            if token_id is None:
                ids = _id_list(generation_config.get(id_key)) or _id_list(model_config.get(id_key))
                token_id = ids[0] if ids else backend.own_special_ids.get(id_key)
                token = backend.id_to_token(token_id) if token_id is not None else token
            return token, token_id

        bos_token, bos_id = lookup("bos_token", "bos_token_id")
        eos_token, eos_id = lookup("eos_token", "eos_token_id")
        _, pad_id = lookup("pad_token", "pad_token_id")
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None:
                named.setdefault(name, token)

        stop_ids: list[int] = []
        for token_id in [
            eos_id,
            *_id_list(generation_config.get("eos_token_id")),
            *_id_list(model_config.get("eos_token_id")),
        ]:
            if token_id is not None and token_id not in stop_ids:
                stop_ids.append(token_id)

        add_bos = tokenizer_config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            if isinstance(backend, _TokenizersBackend):
                add_bos = backend.bos_added_by_post_processor(bos_id)
            else:
                # sentencepiece has no post-processor; Hugging Face's sentencepiece tokenizers prepend BOS.
                add_bos = bos_id is not None

        settings = dict(
            bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, bos_token=bos_token, eos_token=eos_token,
            stop_ids=stop_ids, add_bos=add_bos and bos_id is not None,
            chat_template=_read_chat_template(folder, tokenizer_config), special_tokens=named,
        )
        return cls(backend, folder, settings)

    @staticmethod
    def _load_backend(folder: Path, special_strings: list[str]) -> _Backend:
        if (folder / "tokenizer.json").is_file():
            backend = _TokenizersBackend.from_json(folder / "tokenizer.json")
            backend.add_special_tokens(special_strings)
            return backend
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _TokenizersBackend.from_vocab_and_merges(
                folder / "vocab.json", folder / "merges.txt", special_strings
            )
        if (folder / "tokenizer.model").is_file():
            return _SentencePieceBackend(folder / "tokenizer.model", special_strings)
        raise CheckpointError(
            f"{folder}: no tokenizer found (expected tokenizer.json, vocab.json + merges.txt, or tokenizer.model)"
        )

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        return self.encode_with_offsets(text, add_bos, add_eos)[0]

    def encode_with_offsets(
        self, text: str, add_bos: bool | None = None, add_eos: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the character (start, end) span in `text` of each; an added BOS spans (0, 0), an added EOS
        (len, len). BOS is never added in front of a text that already starts with it (a rendered template)."""
        ids, offsets = self.backend.encode(text)
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        if add_eos and self.eos_id is not None:
            ids, offsets = [*ids, self.eos_id], [*offsets, (len(text), len(text))]
        return ids, offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def special_tokens(self) -> dict[str, str]:
        """Named special tokens (bos_token, eos_token, ...) -> their strings, as chat templates receive them."""
        return dict(self._special_tokens)
