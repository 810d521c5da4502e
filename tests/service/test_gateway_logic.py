"""The gateway's pure request logic, without Ray: option mapping, audio decoding, prompt splitting, error codes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos.minicpmo.v1 import omni_pb2
from ray.exceptions import ActorDiedError

from services.common.generation import CHAT_DEFAULTS, STREAMING_DEFAULTS
from services.gateway.auth import PermissionDenied, Unauthenticated
from services.gateway.context import prefill_input
from services.gateway.live import prompt_state
from services.gateway.prompts import Prompt, turn_markup
from services.gateway.requests import InvalidRequest, LimitExceeded, Limits, decode_pcm, sampling_params
from services.gateway.servicer import status_for
from services.gateway.sessions import InvalidTurn
from services.runtime.errors import InvalidArgument
from services.runtime.ownership import SessionLimitExceeded, SessionNotFound, StoreUnavailable


def opts(**kw) -> omni_pb2.GenerationOptions:
    o = omni_pb2.GenerationOptions(max_new_tokens=kw.pop("max_new_tokens", 0), min_new_tokens=kw.pop("min_new_tokens", 0))
    for k, v in kw.items():
        setattr(o.sampling, k, v)
    return o


def test_sampling_defaults_greedy_and_overrides():
    lim = Limits()
    assert sampling_params(opts(), CHAT_DEFAULTS, lim) == CHAT_DEFAULTS
    assert sampling_params(opts(), STREAMING_DEFAULTS, lim).max_new_tokens == STREAMING_DEFAULTS.max_new_tokens
    g = sampling_params(opts(greedy=True, max_new_tokens=7), CHAT_DEFAULTS, lim)
    assert g.greedy and g.repetition_penalty == 1.0 and g.max_new_tokens == 7
    s = sampling_params(opts(temperature=0.3, top_k=5, seed=11), CHAT_DEFAULTS, lim)
    assert s.temperature == pytest.approx(0.3) and (s.top_k, s.seed, s.top_p) == (5, 11, CHAT_DEFAULTS.top_p)
    with pytest.raises(LimitExceeded):
        sampling_params(opts(max_new_tokens=lim.max_new_tokens + 1), CHAT_DEFAULTS, lim)
    assert sampling_params(opts(temperature=0.0), CHAT_DEFAULTS, lim).greedy  # OpenAI-style greedy


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1.0),
     dict(top_p=0.0), dict(top_p=2.0), dict(top_p=float("nan")), dict(top_k=-1),
     dict(repetition_penalty=0.0), dict(repetition_penalty=float("nan")), dict(repetition_penalty=-2.0),
     dict(min_new_tokens=10**9), dict(min_new_tokens=9, max_new_tokens=8)],
)  # fmt: skip
def test_bad_sampling_settings_are_invalid_arguments(bad):
    with pytest.raises(InvalidArgument):
        sampling_params(opts(**bad), CHAT_DEFAULTS, Limits())


def test_unknown_speech_output_is_refused():
    o = opts()
    o.speech.output = 99
    with pytest.raises(InvalidRequest, match="speech.output 99"):
        sampling_params(o, CHAT_DEFAULTS, Limits())


def test_decode_pcm_formats_and_errors():
    x = (np.sin(np.arange(16000) / 10) * 0.5).astype(np.float32)
    f32 = decode_pcm(omni_pb2.Audio(pcm=x.tobytes(), sample_rate=16000), 60)
    np.testing.assert_array_equal(f32, x)
    i16 = (x * 32767).astype("<i2")
    got = decode_pcm(omni_pb2.Audio(pcm=i16.tobytes(), format=omni_pb2.SAMPLE_FORMAT_INT16, sample_rate=16000), 60)
    np.testing.assert_allclose(got, x, atol=1e-4)
    assert decode_pcm(omni_pb2.Audio(pcm=x.tobytes(), sample_rate=48000), 60).shape[0] == pytest.approx(16000 / 3, abs=2)
    for bad in (omni_pb2.Audio(pcm=x.tobytes()), omni_pb2.Audio(pcm=b"abc", sample_rate=16000),
                omni_pb2.Audio(pcm=b"", sample_rate=16000), omni_pb2.Audio(pcm=x.tobytes(), sample_rate=12345),
                omni_pb2.Audio(pcm=x.tobytes(), sample_rate=16000, format=7)):  # fmt: skip
        with pytest.raises(InvalidArgument):
            decode_pcm(bad, 60)


def test_loud_audio_is_scaled_to_full_scale_not_refused():
    x = (np.sin(np.arange(16000) / 10) * 0.5).astype(np.float32)
    loud = decode_pcm(omni_pb2.Audio(pcm=(x * 1e19).astype(np.float32).tobytes(), sample_rate=16000), 60)
    assert np.isfinite(loud).all() and np.abs(loud).max() == pytest.approx(1.0)
    np.testing.assert_allclose(loud, x / np.abs(x).max(), rtol=1e-5, atol=1e-6)


def test_prefill_input_spans_are_relative_to_the_slice():
    p = Prompt(text="", rendered="", input_ids=list(range(20)), image_bounds=[(2, 5)], audio_bounds=[(12, 15)],
               spk_bounds=[])  # fmt: skip
    whole = prefill_input(p)
    assert [(s.start, s.end) for s in whole.image_spans] == [(2, 5)]
    tail = prefill_input(p, 10, 20)
    assert list(tail.input_ids) == list(range(10, 20)) and not tail.image_spans
    assert [(s.start, s.end) for s in tail.audio_spans] == [(2, 5)]
    with pytest.raises(InvalidRequest):
        prefill_input(p, 3, 20)


@pytest.mark.parametrize(
    "prev, markup",
    [("idle", turn_markup("system")), ("answered", turn_markup("answer")),
     ("interrupted", turn_markup("interrupt")), ("answering", turn_markup("interrupt")), ("user_turn", ("", ""))],
)  # fmt: skip
def test_turn_state_gives_upstream_prefix(prev, markup):
    assert prompt_state(prev).next_prefix("user") == (False, markup)


@pytest.mark.parametrize(
    "exc, code",
    [
        (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (SessionNotFound("s"), grpc.StatusCode.NOT_FOUND),
        (InvalidTurn("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (SessionLimitExceeded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LimitExceeded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (StoreUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (ActorDiedError(), grpc.StatusCode.UNAVAILABLE),
        (ValueError("x"), grpc.StatusCode.INTERNAL),  # only errors that say they are the caller's are
        (RuntimeError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_codes(exc, code):
    got, msg = status_for(exc)
    assert got == code and msg
