"""Incremental detokenization, stop conditions and the output dataclasses.

The tokenizer is a tiny byte-level BPE trained here on multilingual text, so
that many tokens hold only part of a multi-byte character, wrapped in the
project's `loong_jax.models.tokenizer.Tokenizer`.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from loong_jax.sampling.detokenizer import IncrementalDetokenizer, SequenceDetokenizer
from loong_jax.models.tokenizer import Tokenizer
from loong_jax.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from loong_jax.sampling.params import SamplingParams
from loong_jax.sampling.stop_strings import ROOT, StopStringMatcher

SPECIALS = ["<|pad|>", "<|eos|>", "<|im_end|>"]
CORPUS = ["hello world, the quick brown fox", "中文字符 测试 中文 文字", "emoji 😀🎉 😀 party 🎉",
          "café naïve déjà vu", "Ελληνικά русский язык", "STOP here ### end\n\n"]
ALPHABET = "ab c\n中文😀éΩ#"


def train_byte_level(corpus: list[str], vocab_size: int = 300) -> FastTokenizer:
    fast = FastTokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    fast.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    fast.train_from_iterator(corpus * 5, trainer=trainer)
    return fast


TOKENIZER = Tokenizer(train_byte_level(CORPUS),
                      special_tokens={"eos_token": "<|eos|>", "pad_token": "<|pad|>"},
                      add_bos_token=None, add_eos_token=None, chat_template=None)
EOS = TOKENIZER.eos_token_id
IM_END = TOKENIZER.token_to_id("<|im_end|>")
VOCAB = TOKENIZER.vocab_size


def encode(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def run(ids, params, prompt=(), chunks=None, eos=(EOS,)):
    """Feeds ids (in the given chunk sizes, default one by one); returns the sequence and its deltas."""
    sequence = SequenceDetokenizer(TOKENIZER, params, prompt, eos)
    deltas, position, sizes = [], 0, list(chunks or [])
    while position < len(ids) and not sequence.finished:
        size = sizes.pop(0) if sizes else 1
        deltas.append(sequence.update(ids[position:position + size]))
        position += size
    return sequence, deltas


def joined(deltas) -> str:
    return "".join(delta.text for delta in deltas)


def test_multibyte_characters_are_held_until_complete():
    ids = encode("中文😀")
    assert any("\ufffd" in TOKENIZER.decode(ids[:i]) for i in range(len(ids)))  # the test bites
    sequence, deltas = run(ids, SamplingParams(max_tokens=len(ids)))
    assert all("\ufffd" not in delta.text for delta in deltas)
    assert joined(deltas) == "中文😀" and sequence.finish_reason == "length"
    assert [t for d in deltas for t in d.token_ids] == ids


def test_prompt_context_keeps_leading_spaces_of_sentencepiece_style_tokenizers():
    fast = FastTokenizer(models.BPE(unk_token="<unk>"))
    fast.pre_tokenizer = pre_tokenizers.Metaspace()
    fast.decoder = decoders.Metaspace()
    fast.train_from_iterator(["Hi there friend", "Hi there"] * 5, trainer=trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>"], show_progress=False))
    prompt, output = fast.encode("Hi").ids, fast.encode(" there friend").ids
    assert fast.decode(output) == "there friend"  # alone, the first space is stripped
    detokenizer = IncrementalDetokenizer(fast, prompt)
    assert "".join(detokenizer.add_token(t) for t in output) + detokenizer.flush() == " there friend"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40), st.lists(st.integers(1, 4), max_size=20))
def test_valid_text_streams_exactly_and_cleanly(text, chunks):
    ids = encode(text)
    if not ids:
        return
    sequence, deltas = run(ids, SamplingParams(max_tokens=len(ids)), chunks=chunks)
    assert all("\ufffd" not in delta.text for delta in deltas)
    assert joined(deltas) == TOKENIZER.decode(ids) == text
    assert sequence.output().text == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), st.booleans(),
       st.lists(st.integers(1, 3), max_size=20))
def test_random_tokens_stream_to_the_full_decode(ids, skip_special, chunks):
    params = SamplingParams(max_tokens=len(ids), ignore_eos=True, skip_special_tokens=skip_special)
    sequence, deltas = run(ids, params, chunks=chunks)
    full = TOKENIZER.decode(ids, skip_special_tokens=skip_special)
    assert joined(deltas) == full and sequence.finish_reason == "length"
    for delta in deltas:
        assert "\ufffd" not in delta.text or "\ufffd" in full


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=20), st.text(alphabet=ALPHABET, min_size=1, max_size=20))
def test_output_after_a_prompt_is_the_prompts_continuation(prompt_text, output_text):
    prompt, output = encode(prompt_text), encode(output_text)
    _, deltas = run(output, SamplingParams(max_tokens=len(output)), prompt=prompt)
    full = TOKENIZER.decode(prompt + output)
    assert joined(deltas) == full[len(TOKENIZER.decode(prompt)):] == output_text


def reference_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Cut before the first stop string to complete, reading one character at a time."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return text[:end - len(stop)], stop
    return text, None


def longest_pending_prefix(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
               default=0)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab中😀 ", min_size=1, max_size=30),
       st.lists(st.text(alphabet="ab中😀 ", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_strings_cut_before_the_first_completed_stop(text, stops):
    ids = encode(text)
    sequence = SequenceDetokenizer(TOKENIZER, SamplingParams(max_tokens=len(ids), stop=stops), (), (EOS,))
    streamed = ""
    for count in range(1, len(ids) + 1):
        streamed += sequence.update(ids[count - 1:count]).text
        if sequence.finished:
            break
        # Held back: the incomplete character and exactly what could still start a stop string.
        so_far = TOKENIZER.decode(ids[:count]).rstrip("\ufffd")
        assert streamed == so_far[:len(so_far) - longest_pending_prefix(so_far, stops)]
    want_text, want_stop = reference_stop(text, stops)
    assert streamed == want_text == sequence.output().text
    assert sequence.finish_reason == ("stop" if want_stop else "length")
    assert sequence.stop_reason == want_stop


def test_stop_string_split_across_tokens():
    ids = encode("hello ST") + encode("OP there")
    sequence, deltas = run(ids, SamplingParams(max_tokens=50, stop=["STOP", "zzz"]))
    assert joined(deltas) == "hello " and sequence.finish_reason == "stop"
    assert sequence.stop_reason == "STOP"
    assert all("S" not in delta.text for delta in deltas)  # "ST" was held back, never emitted
    assert TOKENIZER.decode(sequence.token_ids).startswith("hello STOP")  # ids up to the stop's end


def test_matcher_reports_the_earliest_end_and_bounds_the_hold_back():
    matcher = StopStringMatcher(["abcd", "bc", "xyz"])
    state, match = matcher.feed(ROOT, "zabcd")
    assert (match.end, match.stop) == (4, "bc")
    state, match = matcher.feed(ROOT, "qxy")
    assert match is None and matcher.hold_back(state) == 2
    hostile = StopStringMatcher(["a" * 255 + str(i) for i in range(64)])
    state, match = hostile.feed(ROOT, "a" * 10_000)
    assert match is None and hostile.hold_back(state) == 255


def test_eos_and_stop_token_ids_finish_with_stop():
    body = encode("hello world")
    sequence, deltas = run(body + [EOS] + encode("more"), SamplingParams(max_tokens=50))
    assert (sequence.finish_reason, sequence.stop_reason) == ("stop", None)
    assert sequence.token_ids == body + [EOS] and joined(deltas) == "hello world"

    sequence, deltas = run(body + [IM_END, 5], SamplingParams(max_tokens=50, stop_token_ids=[IM_END],
                                                              skip_special_tokens=False))
    assert (sequence.finish_reason, sequence.stop_reason) == ("stop", IM_END)
    assert joined(deltas) == "hello world"  # the stop token's own text is not output

    sequence, deltas = run(body + [EOS] + encode(" ok"), SamplingParams(max_tokens=50, ignore_eos=True))
    assert sequence.finish_reason is None and joined(deltas) == "hello world ok"


def test_no_stop_before_min_tokens():
    sequence, deltas = run([EOS, EOS] + encode("##"), SamplingParams(max_tokens=50, min_tokens=2, stop=["#"]))
    assert sequence.finish_reason == "stop" and sequence.stop_reason == "#" and joined(deltas) == ""
    assert sequence.num_tokens == 3
    ids = encode("a#b") + [EOS]
    sequence, deltas = run(ids, SamplingParams(max_tokens=50, min_tokens=3, stop=["#"]))
    assert joined(deltas) == "a#b" and sequence.finish_reason == "stop" and sequence.stop_reason is None


def test_length_abort_logprobs_and_finished_guard():
    ids = encode("hello world, the quick")
    sequence, deltas = run(ids, SamplingParams(max_tokens=3, stop=["zz"]))
    assert sequence.finish_reason == "length" and sequence.num_tokens == 3
    assert joined(deltas) == TOKENIZER.decode(ids[:3])
    with pytest.raises(RuntimeError, match="already finished"):
        sequence.update([1])

    sequence = SequenceDetokenizer(TOKENIZER, SamplingParams(max_tokens=10, stop=["uick!"], logprobs=1))
    entries = [TokenLogprobs(token_id=t, logprob=-0.5, rank=1, top=((t, -0.5),)) for t in ids[:2]]
    first = sequence.update(ids[:2], entries)
    assert first.logprobs == entries and first.finish_reason is None
    last = sequence.abort()
    assert last.finish_reason == "abort" and last.token_ids == [] and last.logprobs == []
    assert sequence.output().text == TOKENIZER.decode(ids[:2])
    for given in (entries[:1], None):
        with pytest.raises(ValueError, match="asked for logprobs"):
            SequenceDetokenizer(TOKENIZER, SamplingParams(logprobs=2)).update([1, 2], given)


def test_request_output_merges_deltas_into_the_cumulative_form():
    ids = encode("中文 hello 😀") + [EOS]
    samples = [SequenceDetokenizer(TOKENIZER, SamplingParams(n=2, max_tokens=20), (), (EOS,), index=i)
               for i in range(2)]
    start = merged = RequestOutput("r1", "prompt", [1, 2], outputs=[], finished=False)
    deltas = []
    for token in ids:
        delta = RequestOutput("r1", "prompt", [1, 2], [s.update([token]) for s in samples],
                              finished=all(s.finished for s in samples), delta=True)
        merged = merged.merged(delta)
        deltas.append(delta)
    assert merged.finished and merged.outputs == [s.output() for s in samples]
    assert start.merged_all(deltas) == merged and start.merged_all([]) is start  # one pass, same result
    assert merged.text == "中文 hello 😀" and merged.finish_reason == "stop" and merged.token_ids == ids
    with pytest.raises(ValueError, match="finish_reason"):
        CompletionOutput(index=0, finish_reason="done")
    with pytest.raises(ValueError, match="request"):
        merged.merged(RequestOutput("r2", None, [], [], True))


def test_metrics_spans():
    metrics = RequestMetrics(arrival_time=10.0)
    assert metrics.queue_time is None and metrics.time_to_first_token is None
    metrics.record_scheduled(10.5)
    metrics.record_scheduled(11.0)  # a preempted request keeps its first schedule
    metrics.record_token(12.0)
    metrics.record_token(13.0)
    metrics.record_finished(15.0)
    assert (metrics.queue_time, metrics.time_to_first_token, metrics.decode_time, metrics.latency) == \
        (0.5, 2.0, 3.0, 5.0)
    assert metrics.last_token_time == 13.0
