"""The tokenizer of a Hugging Face checkpoint directory, without `transformers`.

Data flow:
  1. `Tokenizer.from_dir(dir)` loads `tokenizer.json` with the `tokenizers`
     library (a missing file is one `TokenizerError` line), then reads the
     optional side files: `tokenizer_config.json` (special tokens,
     `add_bos_token` / `add_eos_token`, `chat_template`), `special_tokens_map.json`,
     `chat_template.jinja` (where newer `transformers` saves the template),
     `config.json` and `generation_config.json` (BOS / EOS / PAD ids).
  2. `encode(text)` adds BOS / EOS as `add_bos_token` / `add_eos_token` say
     when the config sets them, otherwise as the tokenizer's own
     post-processor does; `decode(ids)` drops special tokens by default.
     Text that is not a str, or holds a lone surrogate, is a `TokenizerError`
     (`check_encodable`), never the Rust library's TypeError.
  3. `eos_token_ids` merges every EOS the files name (tokenizer config,
     config.json, generation_config.json), because chat models often stop on
     an end-of-turn token that only generation_config.json lists.
  4. `apply_chat_template(messages)` renders the jinja2 `chat_template` in a
     sandbox, with the variables and helpers (`raise_exception`, `tojson`,
     `strftime_now`, `bos_token`, `eos_token`, ...) that templates written for
     `transformers` expect.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used as asked; the message names the file or field."""


def check_encodable(text: str, field: str = "text") -> str:
    """`text` if it is a str the tokenizer can take: not bytes, no lone surrogate (which has no UTF-8 form,
    so the Rust tokenizer would refuse it with a TypeError)."""
    if not isinstance(text, str):
        raise TokenizerError(f"{field} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TokenizerError(f"{field} is not valid Unicode: {err.reason} at character {err.start} "
                             f"({text[err.start]!r})") from None
    return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path} is not valid JSON ({err})") from None


def _token_text(value: Any) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _chat_template_from(config: dict[str, Any], template_file: Path) -> str | None:
    if template_file.exists():
        return template_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _raise_template_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _template_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class Tokenizer:
    """Encode / decode / chat template for one checkpoint directory."""

    def __init__(self, fast: FastTokenizer, *, special_tokens: dict[str, str | None],
                 add_bos_token: bool | None, add_eos_token: bool | None,
                 chat_template: str | None, extra_eos_ids: Sequence[int] = (),
                 fallback_bos_id: int | None = None, fallback_pad_id: int | None = None,
                 source: str = "tokenizer"):
        self._fast = fast
        self._special_tokens = dict(special_tokens)
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self.chat_template = chat_template
        self._source = source
        self.bos_token_id = self._id_of(special_tokens.get("bos_token"))
        if self.bos_token_id is None:
            self.bos_token_id = fallback_bos_id
        self.pad_token_id = self._id_of(special_tokens.get("pad_token"))
        if self.pad_token_id is None:
            self.pad_token_id = fallback_pad_id
        eos_ids = [self._id_of(special_tokens.get("eos_token"))] + list(extra_eos_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self._template = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise TokenizerError(f"missing tokenizer: no tokenizer.json in {path}")
        try:
            fast = FastTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust error type is not exported
            raise TokenizerError(f"cannot read {tokenizer_file}: {err}") from None
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        model_config = _read_json(path / "config.json")
        generation_config = _read_json(path / "generation_config.json")

        special_tokens = {key: _token_text(tokenizer_config.get(key, special_map.get(key)))
                          for key in SPECIAL_TOKEN_KEYS}
        extra_eos = (_as_id_list(model_config.get("eos_token_id"))
                     + _as_id_list(generation_config.get("eos_token_id")))
        fallback_bos = generation_config.get("bos_token_id", model_config.get("bos_token_id"))
        fallback_pad = generation_config.get("pad_token_id", model_config.get("pad_token_id"))
        return cls(fast, special_tokens=special_tokens,
                   add_bos_token=tokenizer_config.get("add_bos_token"),
                   add_eos_token=tokenizer_config.get("add_eos_token"),
                   chat_template=_chat_template_from(tokenizer_config, path / "chat_template.jinja"),
                   extra_eos_ids=extra_eos, fallback_bos_id=fallback_bos, fallback_pad_id=fallback_pad,
                   source=str(path))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._fast.token_to_id(token)

    # ------------------------------------------------------------------ tokens
    @property
    def vocab_size(self) -> int:
        return self._fast.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """bos/eos/unk/pad token strings as the config files name them."""
        return dict(self._special_tokens)

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of every added token marked special in tokenizer.json."""
        decoder = self._fast.get_added_tokens_decoder()
        return tuple(sorted(i for i, token in decoder.items() if token.special))

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self._fast.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._fast.id_to_token(token_id)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with BOS/EOS per the config when add_special_tokens."""
        check_encodable(text)
        if not add_special_tokens:
            return self._fast_ids(text, add_special_tokens=False)
        if self._add_bos_token is None and self._add_eos_token is None:
            return self._fast_ids(text, add_special_tokens=True)
        # The config decides explicitly: wrap the plain encoding ourselves.
        ids = self._fast_ids(text, add_special_tokens=False)
        if self._add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if self._add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def _fast_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        # The Rust `encode` holds the GIL throughout (about 1.2 s per MiB), `encode_batch` releases it: a
        # long text tokenized in a worker thread then stalls no other thread (a server's event loop, the
        # engine thread). Same ids; no measurable cost on short texts.
        return self._fast.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(text, add_special_tokens) for text in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **template_vars: Any) -> str | list[int]:
        """Renders `messages` ([{"role": ..., "content": ...}]) with the checkpoint's template.

        Returns the prompt text, or its ids when tokenize=True (no extra BOS: the
        template writes the special tokens it wants).
        """
        if self.chat_template is None:
            raise TokenizerError(f"tokenizer in {self._source} has no chat_template "
                                 "(neither tokenizer_config.json nor chat_template.jinja defines one)")
        if self._template is None:
            try:
                self._template = _template_environment().from_string(self.chat_template)
            except jinja2.exceptions.TemplateSyntaxError as err:
                raise TokenizerError(f"chat_template of {self._source} does not parse: {err}") from None
        variables = {key: value for key, value in self._special_tokens.items() if value is not None}
        variables.update(template_vars)
        try:
            text = self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except (jinja2.exceptions.TemplateError, TypeError) as err:  # TypeError: e.g. a str + an int content
            raise TokenizerError(f"chat_template of {self._source} failed: {err}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text
