"""Prompt forms and their validation, shared by the Python API (`LLM`, `AsyncLLM`) and the server.

A prompt is one of:
  * text: a non-empty `str` (bytes must be decoded first; a lone surrogate cannot be tokenized);
  * token ids: a non-empty list, tuple or 1-D array of ints in [0, vocab_size);
  * chat messages: a non-empty list of {"role": non-empty str, "content": str} dicts;
  * a dict: {"prompt": text}, {"prompt_token_ids": ids} (with an optional "prompt" text that outputs
    show) or {"messages": chat messages}.
Empty prompts are refused in every form, as vLLM and the server refuse them.

Data flow of `prompt_token_ids(prompt, tokenizer, vocab_size)`:
  1. The form is recognised; anything else raises ValueError naming the type it got.
  2. Its parts are checked (`check_text`, `check_prompt_token_ids`, `check_messages`): ValueError naming the
     field (`prompt`, `prompt_token_ids[3]`, `messages[0].role`) and what is wrong with it.
  3. Text is tokenized (BOS / EOS as the tokenizer's config says); chat goes through the model's template
     (which writes its own special tokens).
  4. Returns (text or None, token ids); a template that renders nothing is refused too.
The server's admission runs the same checks on the fields of a Generate call, so both refuse the same
prompts. `split_prompts` turns what `LLM.generate` was given into a list of prompts.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from loong_jax.models.tokenizer import Tokenizer, check_encodable

Prompt = Any  # str | list[int] | list[dict] (chat messages) | dict (see the module docstring)
PROMPT_DICT_KEYS = ("prompt", "prompt_token_ids", "messages")
MESSAGE_KEYS = ("role", "content")
SHOWN_CHARS = 60  # bad values are quoted up to this length in error messages


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # ints beyond Python's digit limit refuse to print
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _is_token_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_text(text: Any, field: str = "prompt") -> str:
    """A non-empty string that can be tokenized."""
    if isinstance(text, (bytes, bytearray)):
        raise ValueError(f"{field} is bytes; decode it to str first (e.g. text.decode('utf-8'))")
    if not isinstance(text, str):
        raise ValueError(f"{field} must be a string, got {type(text).__name__} {_shown(text)}")
    if not text:
        raise ValueError(f"{field}: the prompt is empty")
    return check_encodable(text, field)


def check_token_ids(ids: Any, vocab_size: int, field: str = "prompt_token_ids") -> list[int]:
    """Every id an int in [0, vocab_size) (an empty list passes: callers decide whether it may be empty)."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"{field} must be one-dimensional, got an array of shape {ids.shape}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{field} must be a list of token ids, got {type(ids).__name__} {_shown(ids)}")
    checked = []
    for index, token in enumerate(ids):
        if not _is_token_id(token):
            raise ValueError(f"{field}[{index}] must be a token id (an int), got {type(token).__name__} "
                             f"{_shown(token)}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"{field}[{index}] must be a token id in [0, {vocab_size - 1}], got {_shown(int(token))}")
        checked.append(int(token))
    return checked


def check_prompt_token_ids(ids: Any, vocab_size: int, field: str = "prompt_token_ids") -> list[int]:
    """`check_token_ids`, and at least one id."""
    checked = check_token_ids(ids, vocab_size, field)
    if not checked:
        raise ValueError(f"{field}: the prompt is empty (no token ids)")
    return checked


def check_messages(messages: Any, field: str = "messages") -> list[dict[str, str]]:
    """A non-empty list of {"role": non-empty str, "content": str} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{field} must be a list of {{'role': ..., 'content': ...}} dicts, got "
                         f"{type(messages).__name__} {_shown(messages)}")
    if not messages:
        raise ValueError(f"{field}: the conversation is empty")
    checked = []
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be a {{'role': ..., 'content': ...}} dict, got "
                             f"{type(message).__name__} {_shown(message)}")
        missing = [key for key in MESSAGE_KEYS if key not in message]
        unknown = sorted(str(key) for key in message if key not in MESSAGE_KEYS)
        if missing or unknown:
            raise ValueError(f"{where} must hold exactly 'role' and 'content'"
                             + (f"; missing {', '.join(map(repr, missing))}" if missing else "")
                             + (f"; unknown {', '.join(map(repr, unknown))}" if unknown else ""))
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}.role must be a non-empty string, got {_shown(role)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string, got {type(content).__name__} {_shown(content)}")
        checked.append({"role": check_encodable(role, f"{where}.role"),
                        "content": check_encodable(content, f"{where}.content")})
    return checked


def render_chat(tokenizer: Tokenizer, messages: Any, field: str = "messages") -> tuple[str, list[int]]:
    """(prompt text, ids) of a conversation through the model's chat template."""
    checked = check_messages(messages, field)
    try:
        text = tokenizer.apply_chat_template(checked, add_generation_prompt=True)
    except ValueError as err:  # TokenizerError: no template, or the template refused the messages
        raise ValueError(f"{field}: {err}") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{field}: the chat template rendered an empty prompt")
    return text, ids


def prompt_token_ids(prompt: Prompt, tokenizer: Tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of one prompt in any form; ValueError naming the problem otherwise."""
    if isinstance(prompt, Mapping):
        return _dict_prompt(prompt, tokenizer, vocab_size)
    if isinstance(prompt, (list, tuple)) and any(isinstance(item, Mapping) for item in prompt):
        return render_chat(tokenizer, prompt)
    if isinstance(prompt, (list, tuple, np.ndarray)):
        return None, check_prompt_token_ids(prompt, vocab_size, "prompt_token_ids")
    if isinstance(prompt, (str, bytes, bytearray)):
        text = check_text(prompt, "prompt")
        return text, tokenizer.encode(text)
    raise ValueError(f"a prompt is a string, a list of token ids, a list of chat messages or a dict "
                     f"({', '.join(PROMPT_DICT_KEYS)}), got {type(prompt).__name__} {_shown(prompt)}")


def _dict_prompt(prompt: Mapping, tokenizer: Tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
    unknown = sorted(str(key) for key in prompt if key not in PROMPT_DICT_KEYS)
    if unknown:
        hint = " (a chat message? pass the conversation as a list of messages)" if "role" in prompt else ""
        raise ValueError(f"a prompt dict holds {', '.join(map(repr, PROMPT_DICT_KEYS))}; unknown "
                         f"{', '.join(map(repr, unknown))}{hint}")
    given = [key for key in PROMPT_DICT_KEYS if key in prompt]
    if given == ["prompt", "prompt_token_ids"]:  # ids to run, and the text outputs show for them
        shown_text = prompt["prompt"]
        if not isinstance(shown_text, str):
            raise ValueError(f"prompt must be a string, got {type(shown_text).__name__} {_shown(shown_text)}")
        return shown_text, check_prompt_token_ids(prompt["prompt_token_ids"], vocab_size, "prompt_token_ids")
    if len(given) != 1:
        raise ValueError(f"a prompt dict needs exactly one of {', '.join(map(repr, PROMPT_DICT_KEYS))} "
                         f"(or 'prompt_token_ids' with a 'prompt' text), got {given or 'none'}")
    key = given[0]
    if key == "prompt":
        text = check_text(prompt["prompt"], "prompt")
        return text, tokenizer.encode(text)
    if key == "messages":
        return render_chat(tokenizer, prompt["messages"])
    return None, check_prompt_token_ids(prompt["prompt_token_ids"], vocab_size, "prompt_token_ids")


def split_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, chat messages, dict) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, bytes, bytearray, Mapping)):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, token ids, chat messages or a list of those, "
                         f"got {type(prompts).__name__} {_shown(prompts)}")
    if not prompts:
        raise ValueError("no prompts given (an empty list)")
    if all(isinstance(p, (numbers.Number, np.bool_)) for p in prompts):
        return [list(prompts)]  # one prompt of token ids (each id is checked later)
    if all(isinstance(p, Mapping) for p in prompts) and any("role" in p or "content" in p for p in prompts):
        return [list(prompts)]  # one chat
    return list(prompts)
