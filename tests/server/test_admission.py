"""Admission and the Python API refuse the same malformed and empty prompts (one shared validation,
`loong_jax.entrypoints.prompts`): the server with INVALID_ARGUMENT, `LLM.prepare` with ValueError, both naming the
problem in the same words, and nothing reaches the engine."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loong_jax.server.admission import Admission, Rejected, ServingLimits
from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.server.wire import chat_messages_to_proto

VOCAB = object()  # stands for the model's vocabulary size (the first id outside it)


def _request(text=None, ids=None, messages=None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4))
    if text is not None:
        request.text = text
    if ids is not None:
        request.token_ids.CopyFrom(pb.TokenIds(ids=ids))
    if messages is not None:
        request.messages.CopyFrom(chat_messages_to_proto(messages))
    return request


# (Python API prompt, Generate call fields, words both messages hold)
SAME_REFUSALS = [
    pytest.param("", dict(text=""), "the prompt is empty", id="empty-text"),
    pytest.param([], dict(ids=[]), "the prompt is empty", id="empty-ids"),
    pytest.param({"messages": []}, dict(messages=[]), "messages: the conversation is empty", id="empty-chat"),
    pytest.param([{"role": "", "content": "Hi"}], dict(messages=[{"role": "", "content": "Hi"}]),
                 "messages[0].role must be a non-empty string", id="empty-role"),
    pytest.param([5, VOCAB], dict(ids=[5, VOCAB]), "[1] must be a token id in [0, ", id="out-of-vocab"),
]


@pytest.mark.parametrize("prompt, fields, words", SAME_REFUSALS)
def test_server_and_python_api_refuse_the_same_prompts(engine, engine_port, prompt, fields, words):
    vocab_size = engine_port.vocab_size

    def resolve(ids):
        return [vocab_size if token is VOCAB else token for token in ids]

    if "ids" in fields:
        fields = {**fields, "ids": resolve(fields["ids"])}
        prompt = resolve(prompt)
    admission = Admission(engine_port, ServingLimits())
    with pytest.raises(Rejected) as refused:
        asyncio.run(admission.admit(_request(**fields), set()))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.message
    with pytest.raises(ValueError) as python_refused:
        engine.llm.prepare(prompt)
    assert words in str(python_refused.value)
    assert not engine.llm.engine.has_unfinished()
