"""The OpenAI-compatible HTTP API through Ray Serve's HTTP proxy, with the official `openai` client: text and
speech answers, streamed and not, image and audio inputs, and errors in OpenAI's shape. The answers are
checked against the gRPC API's answer to the same request: both go through the same pipeline."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import soundfile as sf
import soxr

from protos.minicpmo.v1 import omni_pb2
from services.client.sdk import audio, generation_options, image, text, user
from tests.e2e.media import image_bytes, wav

pytestmark = [pytest.mark.ray, pytest.mark.redis]
MODEL = "MiniCPM-o-2_6"


@pytest.fixture
def oai(served) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{served.http_url}/v1", api_key=served.keys[0], max_retries=0, timeout=120) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pcm16_24k(pcm_16k: np.ndarray) -> bytes:
    return (soxr.resample(pcm_16k, 16000, 24000) * 32767).astype("<i2").tobytes()


def test_models_lists_the_one_model(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_text_answer_is_the_grpc_answer(oai, client):
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello! Who are you?"}], max_tokens=12, temperature=0
    )
    grpc_answer = client.chat([user(text("Hello! Who are you?"))], max_new_tokens=12, greedy=True)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == grpc_answer.final.text
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == MODEL and reply.object == "chat.completion"
    u = grpc_answer.final.usage
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (u.prompt_tokens, u.completion_tokens)
    assert reply.usage.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streamed_text_adds_up_to_the_whole_answer(oai):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count to five."}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))  # fmt: skip
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 2, "the text must arrive in pieces"
    assert "".join(deltas) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_image_and_audio_inputs_are_the_grpc_inputs(oai, client, golden):
    png = image_bytes(golden, "image_small.png")
    speech_file = golden.path("inputs/speech.wav").read_bytes()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png)}"}},
        {"type": "input_audio", "input_audio": {"data": b64(speech_file), "format": "wav"}},
        {"type": "text", "text": "What do you see and hear?"},
    ]
    reply = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8,
                                        temperature=0)  # fmt: skip
    expected = client.chat([user(image(png), audio(wav(golden, "speech.wav")), text("What do you see and hear?"))],
                           max_new_tokens=8, greedy=True)  # fmt: skip
    assert reply.choices[0].message.content == expected.final.text
    assert reply.usage.prompt_tokens == expected.final.usage.prompt_tokens

    pcm16 = {"data": b64(pcm16_24k(wav(golden, "speech.wav"))), "format": "pcm16"}
    as_pcm16 = [{"type": "input_audio", "input_audio": pcm16}, {"type": "text", "text": "And now?"}]
    text_only = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "And now?"}],
                                            max_tokens=4, temperature=0)  # fmt: skip
    with_audio = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": as_pcm16}],
                                             max_tokens=4, temperature=0)  # fmt: skip
    assert with_audio.usage.prompt_tokens > text_only.usage.prompt_tokens  # the 2.6 s of speech is in the prompt


def test_spoken_answer_as_wav(oai, client):
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], modalities=["text", "audio"],
        audio={"voice": "audio_assistant", "format": "wav"}, max_tokens=30, temperature=0,
    )  # fmt: skip
    message = reply.choices[0].message
    grpc_answer = client.chat([user(text("Say something."))], voice_mode=omni_pb2.VOICE_MODE_AUDIO_ASSISTANT,
                              options=generation_options(max_new_tokens=30, greedy=True, speech=True,
                                                         speech_greedy=True))  # fmt: skip
    assert message.content is None and message.audio.transcript == grpc_answer.final.text
    pcm, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="int16")
    assert rate == 24000 and pcm.ndim == 1
    assert pcm.shape[0] == pytest.approx(grpc_answer.final.usage.audio_seconds * 24000, abs=1)
    assert np.abs(pcm).max() > 0


def test_streamed_speech_sends_pcm16_and_transcript_pieces(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], modalities=["text", "audio"],
        audio={"voice": "default", "format": "pcm16"}, max_tokens=30, temperature=0, stream=True,
    )  # fmt: skip
    pcm, transcript, finish = bytearray(), "", None
    audio_chunks = 0
    for chunk in stream:
        choice = chunk.choices[0]
        piece = choice.delta.audio
        if piece is not None and piece.data:
            pcm += base64.b64decode(piece.data)
            audio_chunks += 1
        transcript += piece.transcript or "" if piece is not None else ""
        finish = choice.finish_reason or finish
    assert audio_chunks >= 2 and len(pcm) % 2 == 0 and np.abs(np.frombuffer(bytes(pcm), "<i2")).max() > 0
    assert transcript and finish in ("stop", "length")


def test_reference_voice_in_a_system_message(oai, golden):
    ref = golden.path("inputs/ref_voice_1s.wav").read_bytes()
    reply = oai.chat.completions.create(
        model=MODEL, modalities=["text", "audio"], audio={"voice": "voice_cloning", "format": "pcm16"},
        messages=[{"role": "system", "content": [{"type": "input_audio",
                                                  "input_audio": {"data": b64(ref), "format": "wav"}}]},
                  {"role": "user", "content": "Hi."}], max_tokens=12, temperature=0,
    )  # fmt: skip
    assert len(base64.b64decode(reply.choices[0].message.audio.data)) > 0


def test_bad_key_is_401(served):
    stranger = openai.OpenAI(base_url=f"{served.http_url}/v1", api_key="not-a-key", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError) as err:
        stranger.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("kwargs", "param", "error"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
         "messages[0].content[0].image_url.url", openai.BadRequestError),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", openai.BadRequestError),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio.voice",
         openai.BadRequestError),
        ({"modalities": ["text", "audio"], "audio": {"voice": "omni", "format": "wav"}, "stream": True}, "audio.format",
         openai.BadRequestError),
        ({"temperature": 3}, "temperature", openai.BadRequestError),
        ({"model": "gpt-4o"}, None, openai.NotFoundError),
        ({"max_tokens": 10**6}, None, openai.RateLimitError),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(oai, kwargs, param, error):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(error) as err:
        oai.chat.completions.create(**request)
    body = err.value.body
    assert body["message"] and body["type"] and body["code"] and body["param"] == param


def test_body_that_is_not_json_is_400(served):
    request = urllib.request.Request(f"{served.http_url}/v1/chat/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {served.keys[0]}"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"
