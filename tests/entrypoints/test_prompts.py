"""`loong_jax.entrypoints.prompts`: every prompt form the Python API takes, and every malformed or empty one refused
with a ValueError that names what is wrong (never a TypeError from deeper down)."""

from __future__ import annotations

import numpy as np
import pytest

from loong_jax.models.demo import DEMO_MODEL_DIR
from loong_jax.models.tokenizer import Tokenizer
from loong_jax.entrypoints.prompts import prompt_token_ids, split_prompts

CHAT = [{"role": "user", "content": "Hello"}]

# (prompt, what the message must say): shared by the LLM and AsyncLLM tests.
BAD_PROMPTS = [
    pytest.param("", "prompt: the prompt is empty", id="empty-text"),
    pytest.param([], "prompt_token_ids: the prompt is empty", id="empty-ids"),
    pytest.param({"messages": []}, "messages: the conversation is empty", id="empty-chat"),
    pytest.param({"prompt": ""}, "prompt: the prompt is empty", id="empty-text-dict"),
    pytest.param({"prompt_token_ids": []}, "prompt_token_ids: the prompt is empty", id="empty-ids-dict"),
    pytest.param(b"Hello", "bytes; decode it to str first", id="bytes"),
    pytest.param("Hel\ud800lo", r"prompt is not valid Unicode: surrogates not allowed at character 3",
                 id="lone-surrogate"),
    pytest.param(None, "a prompt is a string.*got NoneType", id="none"),
    pytest.param(5, "a prompt is a string.*got int", id="int"),
    pytest.param([1, [2, 3]], r"prompt_token_ids\[1\] must be a token id \(an int\), got list", id="nested-ids"),
    pytest.param(np.array([[1, 2]]), "one-dimensional, got an array of shape", id="2d-array"),
    pytest.param([1, True], r"prompt_token_ids\[1\] must be a token id \(an int\), got bool", id="bool-id"),
    pytest.param([1, 2.0], r"prompt_token_ids\[1\] must be a token id \(an int\), got float", id="float-id"),
    pytest.param([1, "2"], r"prompt_token_ids\[1\] must be a token id \(an int\), got str", id="str-id"),
    pytest.param([1, -1], r"prompt_token_ids\[1\] must be a token id in \[0, \d+\], got -1", id="negative-id"),
    pytest.param([1, 10**9], r"prompt_token_ids\[1\] must be a token id in \[0, \d+\], got 1000000000",
                 id="out-of-vocab-id"),
    pytest.param([10**5000], "got <int too large to print>", id="huge-id"),
    pytest.param({"prompt": 5}, "prompt must be a string, got int", id="dict-prompt-int"),
    pytest.param({"prompt_token_ids": None}, "prompt_token_ids must be a list of token ids, got NoneType",
                 id="dict-ids-none"),
    pytest.param({"prompt": "Hi", "temperature": 0}, "unknown 'temperature'", id="dict-unknown-key"),
    pytest.param({}, "needs exactly one of", id="dict-empty"),
    pytest.param({"prompt": "Hi", "messages": CHAT}, "needs exactly one of", id="dict-text-and-chat"),
    pytest.param({"prompt": 1, "prompt_token_ids": [1]}, "prompt must be a string", id="dict-shown-text-int"),
    pytest.param({"role": "user", "content": "Hi"}, "a chat message\\? pass the conversation as a list",
                 id="lone-message"),
    pytest.param({"messages": "Hello"}, "messages must be a list of .* dicts, got str", id="messages-str"),
    pytest.param({"messages": [CHAT[0], "Hi"]}, r"messages\[1\] must be a .* dict, got str",
                 id="messages-not-dicts"),
    pytest.param([CHAT[0], 7], r"messages\[1\] must be a .* dict, got int", id="chat-with-int"),
    pytest.param([{"role": "user", "content": 123}], r"messages\[0\]\.content must be a string, got int",
                 id="content-int"),
    pytest.param([{"role": "user", "content": None}], r"messages\[0\]\.content must be a string, got NoneType",
                 id="content-none"),
    pytest.param([{"role": None, "content": "Hi"}], r"messages\[0\]\.role must be a non-empty string, got None",
                 id="role-none"),
    pytest.param([{"role": 3, "content": "Hi"}], r"messages\[0\]\.role must be a non-empty string, got 3",
                 id="role-int"),
    pytest.param([{"role": "", "content": "Hi"}], r"messages\[0\]\.role must be a non-empty string", id="role-empty"),
    pytest.param([{"role": "user", "content": "a\udc80"}], r"messages\[0\]\.content is not valid Unicode",
                 id="content-surrogate"),
    pytest.param([{"role": "us\ud800er", "content": "Hi"}], r"messages\[0\]\.role is not valid Unicode",
                 id="role-surrogate"),
    pytest.param([{"role": "user"}], r"messages\[0\] must hold exactly 'role' and 'content'; missing 'content'",
                 id="message-no-content"),
    pytest.param([{"role": "user", "content": "Hi", "tool": 1}], r"messages\[0\] .*unknown 'tool'",
                 id="message-unknown-key"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(DEMO_MODEL_DIR)


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_bad_prompt_is_a_value_error_naming_the_problem(tokenizer, prompt, message):
    with pytest.raises(ValueError, match=message):
        prompt_token_ids(prompt, tokenizer, tokenizer.vocab_size)


def test_every_prompt_form(tokenizer):
    vocab = tokenizer.vocab_size
    ids = tokenizer.encode("Hello")
    chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    chat = (chat_text, tokenizer.encode(chat_text, add_special_tokens=False))
    assert prompt_token_ids("Hello", tokenizer, vocab) == ("Hello", ids)
    assert prompt_token_ids({"prompt": "Hello"}, tokenizer, vocab) == ("Hello", ids)
    assert prompt_token_ids(ids, tokenizer, vocab) == (None, ids)
    assert prompt_token_ids(tuple(np.array(ids)), tokenizer, vocab) == (None, ids)  # numpy ints become ints
    assert prompt_token_ids(np.array(ids), tokenizer, vocab) == (None, ids)
    assert prompt_token_ids({"prompt_token_ids": ids}, tokenizer, vocab) == (None, ids)
    assert prompt_token_ids({"prompt_token_ids": ids, "prompt": "shown"}, tokenizer, vocab) == ("shown", ids)
    assert prompt_token_ids(CHAT, tokenizer, vocab) == chat
    assert prompt_token_ids({"messages": CHAT}, tokenizer, vocab) == chat
    assert all(type(token) is int for token in prompt_token_ids(np.array(ids), tokenizer, vocab)[1])


def test_split_prompts():
    assert split_prompts("Hi") == ["Hi"]
    assert split_prompts([1, 2]) == [[1, 2]]  # token ids are one prompt
    assert split_prompts([1, 2.0]) == [[1, 2.0]]  # ... whose bad id the prompt check names
    assert split_prompts(CHAT) == [CHAT]  # so is a chat
    assert split_prompts([CHAT[0], {"content": "x"}]) == [[CHAT[0], {"content": "x"}]]  # (then refused)
    assert split_prompts(["a", [1], CHAT, {"prompt": "b"}]) == ["a", [1], CHAT, {"prompt": "b"}]
    assert split_prompts(np.array([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    for bad, message in [([], "no prompts given"), (None, "got NoneType"), ({1, 2}, "got set")]:
        with pytest.raises(ValueError, match=message):
            split_prompts(bad)
