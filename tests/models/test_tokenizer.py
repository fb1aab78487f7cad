"""The checkpoint tokenizer against `transformers`' own loading of the same files."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from loong_jax.models.tokenizer import Tokenizer, TokenizerError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sphinx of black quartz, judge my vow!",
    "Tokenizers split text into pieces; models read the pieces.",
    "Ünïcödé and emoji 🦊 are bytes too.",
] * 10

SPECIALS = ["<s>", "</s>", "<|eot|>", "<pad>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}<|eot|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is a fox? "},
    {"role": "assistant", "content": "An animal."},
    {"role": "user", "content": "And a dog?"},
]


def _train_bpe(with_bos_post_processor: bool) -> FastTokenizer:
    tokenizer = FastTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if with_bos_post_processor:
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    _train_bpe(with_bos_post_processor=True).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True, "__type": "AddedToken"},
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
    }))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 1}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return path


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def theirs(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


TEXTS = ["The quick brown fox.", "  leading spaces and\nnewlines\t", "Ünïcödé 🦊 unseen wörds", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, theirs, text):
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(ours, theirs, text):
    ids = ours.encode(text)
    assert ids[0] == ours.bos_token_id
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_special_token_ids(ours):
    assert ours.bos_token_id == 0
    assert ours.pad_token_id == 3
    assert ours.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": None,
                                   "pad_token": "<pad>"}
    assert ours.all_special_ids == (0, 1, 2, 3)
    assert ours.token_to_id("<|eot|>") == 2 and ours.id_to_token(2) == "<|eot|>"
    # tokenizer_config's EOS first, then the extra end-of-turn id that only generation_config names
    assert ours.eos_token_ids == (1, 2)
    assert ours.eos_token_id == 1


def test_chat_template_matches_transformers(ours, theirs):
    for add_generation_prompt in (True, False):
        text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        expected = theirs.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt,
                                              tokenize=False)
        assert text == expected
    assert text.startswith("<s><|system|>\nBe brief.<|eot|>\n<|user|>\nWhat is a fox?<|eot|>")
    ids = ours.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert ids.count(ours.bos_token_id) == 1  # the template's BOS only, none added on top


def test_chat_template_raise_exception_is_one_line(ours):
    with pytest.raises(TokenizerError, match="unknown role tool") as caught:
        ours.apply_chat_template([{"role": "tool", "content": "42"}])
    assert "\n" not in str(caught.value)


def test_chat_template_file_and_named_templates(tokenizer_dir, tmp_path):
    path = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(path).apply_chat_template(MESSAGES) == "Be brief.!"
    # newer transformers save the template as chat_template.jinja, which wins
    (path / "chat_template.jinja").write_text("{{ messages | length }} messages{{ eos_token }}")
    assert Tokenizer.from_dir(path).apply_chat_template(MESSAGES) == "4 messages</s>"


def test_missing_chat_template_is_one_clear_line(tokenizer_dir, tmp_path):
    path = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(path)
    assert tokenizer.encode("fox")[0] == 0  # the rest still works
    with pytest.raises(TokenizerError, match="has no chat_template") as caught:
        tokenizer.apply_chat_template(MESSAGES)
    assert "\n" not in str(caught.value)


def test_explicit_add_bos_and_eos_flags_override_post_processor(tmp_path):
    """add_bos_token / add_eos_token, when set, decide (as Llama tokenizers in transformers do)."""
    _train_bpe(with_bos_post_processor=False).save(str(tmp_path / "tokenizer.json"))
    plain = Tokenizer.from_dir(tmp_path)  # no config at all: the (empty) post-processor decides
    body = plain.encode("The lazy dog.")
    assert 0 not in body and plain.bos_token_id is None and plain.eos_token_ids == ()

    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": True}))
    flagged = Tokenizer.from_dir(tmp_path)
    assert flagged.encode("The lazy dog.") == [0] + body + [1]
    assert flagged.encode("The lazy dog.", add_special_tokens=False) == body


def test_bos_falls_back_to_generation_config(tmp_path):
    _train_bpe(with_bos_post_processor=False).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_ids == (2,)


def test_missing_tokenizer_json_is_one_clear_line(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="missing tokenizer: no tokenizer.json") as caught:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("fox \ud800 dog", "not valid Unicode: surrogates not allowed at character 4"),  # a lone surrogate
    (b"fox", "must be a str, got bytes"),
    (None, "must be a str, got NoneType"),
])
def test_untokenizable_text_is_a_tokenizer_error_not_a_type_error(ours, text, message):
    with pytest.raises(TokenizerError, match=message):
        ours.encode(text)


def test_chat_template_type_error_is_a_tokenizer_error(ours):
    # The template concatenates 'unknown role ' + role: a None role is a TypeError inside jinja.
    with pytest.raises(TokenizerError, match="chat_template of .* failed"):
        ours.apply_chat_template([{"role": None, "content": "hi"}])
