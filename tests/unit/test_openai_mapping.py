"""OpenAI JSON <-> the public protos, without a server: Chat Completions bodies -> ChatRequest, ChatEvent streams
-> completion objects and chunks, Realtime events -> session settings and generation options, the realtime input
path into AppendUnit calls, and error statuses."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import soundfile as sf

from protos.minicpmo.v1 import omni_pb2
from services.common.generation import CHAT_DEFAULTS
from services.gateway.openai.chat_completions import Completion, ReplyFormat, UnknownModel, parse_body, to_chat_request
from services.gateway.openai.errors import openai_error
from services.gateway.openai.media import InvalidParam
from services.gateway.openai.realtime_events import (
    AudioAppend,
    ResponseFields,
    SessionConfig,
    SessionFields,
    parse_event,
)
from services.gateway.openai.realtime_input import InputSender
from services.gateway.openai.vad import VadSettingsError
from services.gateway.requests import LimitExceeded, Limits, sampling_params
from services.runtime.errors import PermissionDenied, Unauthenticated, Unavailable

MODEL = "MiniCPM-o-2_6"
SR = 16000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(**body) -> tuple[omni_pb2.ChatRequest, ReplyFormat]:
    return to_chat_request(parse_body({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}))


def refused(param: str | None, **body) -> str:
    with pytest.raises(InvalidParam) as err:
        request(**body)
    assert err.value.param == param
    return str(err.value)


# --- Chat Completions requests ------------------------------------------------------------------------------------


def test_messages_map_to_roles_and_parts(golden):
    png = golden.path("inputs/image_small.png").read_bytes()
    wav_file = golden.path("inputs/speech.wav").read_bytes()
    pcm16 = (np.arange(480) - 240).astype("<i2").tobytes()
    chat, fmt = request(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png)}", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": b64(wav_file), "format": "wav"}},
            {"type": "input_audio", "input_audio": {"data": b64(pcm16), "format": "pcm16"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes?"}]},
    ])  # fmt: skip
    roles = [m.role for m in chat.messages]
    assert roles == [omni_pb2.ROLE_SYSTEM, omni_pb2.ROLE_USER, omni_pb2.ROLE_ASSISTANT]
    user = chat.messages[1].content
    assert [p.WhichOneof("part") for p in user] == ["text", "image", "audio", "audio"]
    assert user[1].image.data == png
    samples, rate = sf.read(io.BytesIO(wav_file), dtype="float32")
    assert user[2].audio.sample_rate == rate and user[2].audio.format == omni_pb2.SAMPLE_FORMAT_FLOAT32
    np.testing.assert_array_equal(np.frombuffer(user[2].audio.pcm, "<f4"), samples)
    assert (user[3].audio.pcm, user[3].audio.format, user[3].audio.sample_rate) == (
        pcm16,
        omni_pb2.SAMPLE_FORMAT_INT16,
        24000,
    )
    assert chat.voice_mode == omni_pb2.VOICE_MODE_UNSPECIFIED and not chat.options.speech.enabled
    assert fmt == ReplyFormat(stream=False, include_usage=False, audio_format=None)


def test_stereo_wav_is_averaged_to_mono():
    stereo = np.stack([np.full(1600, 0.5, np.float32), np.full(1600, -0.25, np.float32)], axis=1)
    out = io.BytesIO()
    sf.write(out, stereo, 16000, format="WAV", subtype="FLOAT")
    chat, _ = request(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(out.getvalue()), "format": "wav"}}]}])  # fmt: skip
    np.testing.assert_allclose(np.frombuffer(chat.messages[0].content[0].audio.pcm, "<f4"), 0.125)


def test_sampling_fields_map_and_temperature_zero_is_greedy():
    chat, _ = request(temperature=0, top_p=0.5, top_k=7, repetition_penalty=1.2, seed=11, max_tokens=9)
    params = sampling_params(chat.options, CHAT_DEFAULTS, Limits())
    assert params.greedy and params.max_new_tokens == 9 and params.seed == 11
    chat, _ = request(temperature=0.3, top_p=0.5, top_k=7, repetition_penalty=1.2, max_completion_tokens=5)
    params = sampling_params(chat.options, CHAT_DEFAULTS, Limits())
    assert not params.greedy and (params.temperature, params.top_p, params.top_k) == pytest.approx((0.3, 0.5, 7))
    assert params.repetition_penalty == pytest.approx(1.2) and params.max_new_tokens == 5


def test_speech_answer_takes_a_voice_mode_and_a_reference_voice(golden):
    ref = golden.path("inputs/ref_voice_1s.wav").read_bytes()
    chat, fmt = request(
        modalities=["text", "audio"], audio={"voice": "voice_cloning", "format": "pcm16"}, stream=True, seed=3,
        temperature=0, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": [{"type": "text", "text": "Clone this:"}, audio_part(b64(ref), "wav")]},
                  {"role": "user", "content": "hi"}],
    )  # fmt: skip
    assert chat.voice_mode == omni_pb2.VOICE_MODE_VOICE_CLONING and chat.reference_voice.sample_rate == 16000
    assert [p.text for p in chat.messages[0].content] == ["Clone this:"]  # the audio went to reference_voice
    speech = chat.options.speech
    assert speech.enabled and speech.output == omni_pb2.SPEECH_OUTPUT_AUDIO and speech.greedy and speech.seed == 3
    assert fmt == ReplyFormat(stream=True, include_usage=True, audio_format="pcm16")


def user_part(part: dict) -> dict:
    return {"messages": [{"role": "user", "content": [part]}]}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data: str, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


SPEECH = {"modalities": ["text", "audio"]}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"tools": []}, "tools", "unsupported parameter"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'system', 'developer'"),
        (user_part(image_part("http://x/y.png")), "messages[0].content[0].image_url.url", "data URL"),
        (user_part(image_part("data:image/png,raw")), "messages[0].content[0].image_url.url", "base64"),
        (user_part(audio_part("@@", "wav")), "messages[0].content[0].input_audio.data", "base64"),
        (user_part(audio_part("AAAA", "mp3")), "messages[0].content[0].input_audio.format", "'wav' or 'pcm16'"),
        (user_part(audio_part(b64(b"RIFF"), "wav")), "messages[0].content[0].input_audio.data", "not a readable WAV"),
        (user_part(audio_part("AAAA", "pcm16")), "messages[0].content[0].input_audio.data", "whole 2-byte samples"),
        ({"messages": [{"role": "assistant", "content": [image_part("data:;base64,AA==")]}]}, "messages[0].content[0]",
         "text only"),
        ({"modalities": ["audio"]}, "modalities", "must include"),
        (SPEECH, "audio", "need `audio`"),
        ({"audio": {"voice": "omni", "format": "wav"}}, "audio", "only used with"),
        ({**SPEECH, "audio": {"voice": "alloy", "format": "wav"}}, "audio.voice", "omni"),
        ({**SPEECH, "audio": {"voice": "omni", "format": "wav"}, "stream": True}, "audio.format", "pcm16"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "differ"),
        ({"n": 2}, "n", "1"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "0"),
        ({"temperature": -1}, "temperature", "greater than or equal"),
    ],
)  # fmt: skip
def test_what_does_not_map_is_refused_by_name(body, param, says):
    assert says in refused(param, **body)


def test_unknown_model_is_not_found():
    with pytest.raises(UnknownModel) as err:
        request(model="gpt-4o")
    status, body = openai_error(err.value, "test")
    assert status == 404 and "MiniCPM-o-2_6" in body["message"]


# --- answers --------------------------------------------------------------------------------------------------------


def events(texts: list[str], audio: list[np.ndarray], finish: int) -> list[omni_pb2.ChatEvent]:
    out = [omni_pb2.ChatEvent(text_delta=t) for t in texts]
    out += [
        omni_pb2.ChatEvent(audio=omni_pb2.AudioChunk(pcm=a.astype("<f4").tobytes(), sample_rate=24000)) for a in audio
    ]
    usage = omni_pb2.Usage(prompt_tokens=7, completion_tokens=len(texts))
    out.append(omni_pb2.ChatEvent(final=omni_pb2.FinalEvent(finish_reason=finish, text="".join(texts), usage=usage)))
    return out


async def _aiter(items):
    for item in items:
        yield item


def run_whole(fmt: ReplyFormat, evs) -> dict:
    return asyncio.run(Completion(fmt).whole(_aiter(evs)))


def run_chunks(fmt: ReplyFormat, evs) -> list[dict]:
    async def collect():
        return [c async for c in Completion(fmt).chunks(_aiter(evs))]

    return asyncio.run(collect())


def test_whole_text_answer():
    body = run_whole(ReplyFormat(False, False, None), events(["Hel", "lo"], [], omni_pb2.FINISH_REASON_LENGTH))
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def test_whole_spoken_answer_as_pcm16_and_wav():
    speech = [np.array([0.0, 0.5, -1.0, 2.0], np.float32), np.array([-0.25], np.float32)]
    pcm = run_whole(ReplyFormat(False, False, "pcm16"), events(["Hi"], speech, omni_pb2.FINISH_REASON_STOP))
    message = pcm["choices"][0]["message"]
    assert message["content"] is None and message["audio"]["transcript"] == "Hi"
    samples = np.frombuffer(base64.b64decode(message["audio"]["data"]), "<i2")
    assert samples.tolist() == [0, 16384, -32767, 32767, -8192]  # clipped to full scale, rounded
    wav = run_whole(ReplyFormat(False, False, "wav"), events(["Hi"], speech, omni_pb2.FINISH_REASON_STOP))
    decoded, rate = sf.read(io.BytesIO(base64.b64decode(wav["choices"][0]["message"]["audio"]["data"])), dtype="int16")
    assert rate == 24000 and decoded.tolist() == samples.tolist()


def test_chunks_of_a_text_answer_then_usage():
    chunks = run_chunks(ReplyFormat(True, True, None), events(["a", "b"], [], omni_pb2.FINISH_REASON_STOP))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 9
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_chunks_of_a_spoken_answer_carry_transcript_and_pcm16():
    speech = [np.full(240, 0.5, np.float32)]
    chunks = run_chunks(ReplyFormat(True, False, "pcm16"), events(["Hi"], speech, omni_pb2.FINISH_REASON_STOP))
    audio = [c["choices"][0]["delta"]["audio"] for c in chunks if "audio" in c["choices"][0]["delta"]]
    assert audio[0]["transcript"] == "Hi" and len({a["id"] for a in audio}) == 1
    assert np.frombuffer(base64.b64decode(audio[1]["data"]), "<i2").tolist() == [16384] * 240
    assert all("content" not in c["choices"][0]["delta"] for c in chunks[1:])


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidParam("bad", "x"), 400, "invalid_request_error"),
        (Unauthenticated("no key"), 401, "authentication_error"),
        (PermissionDenied("not yours"), 403, "permission_error"),
        (LimitExceeded("too much"), 429, "rate_limit_error"),
        (Unavailable("down"), 503, "service_unavailable_error"),
        (RuntimeError("bug"), 500, "server_error"),
    ],
)
def test_error_statuses(error, status, kind):
    got, body = openai_error(error, "test")
    assert (got, body["type"]) == (status, kind) and body["message"]


# --- realtime events ------------------------------------------------------------------------------------------------


def test_events_that_are_not_valid_name_the_problem():
    with pytest.raises(InvalidParam, match="not JSON"):
        parse_event("{nope")
    with pytest.raises(InvalidParam, match="does not match any of the expected tags"):
        parse_event('{"type": "input_audio_buffer.shout"}')
    with pytest.raises(InvalidParam) as err:
        parse_event(
            '{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}'
        )
    assert err.value.param == "session.audio.input.turn_detection.type"
    event, event_id = parse_event('{"type": "input_audio_buffer.append", "audio": "AAA=", "event_id": "e1"}')
    assert isinstance(event, AudioAppend) and event_id == "e1"


def update(config: SessionConfig, started: bool = False, **fields) -> SessionConfig:
    return config.updated(SessionFields.model_validate(fields), started, Limits())


def test_session_settings_and_the_options_they_give():
    config = SessionConfig()
    assert config.vad_settings() is not None  # server_vad by default, as OpenAI's
    config = update(config, audio={"output": {"voice": "audio_roleplay"}}, temperature=0, max_output_tokens=42)
    assert config.vad_settings() is not None, "a field left out keeps its value"
    config = update(config, audio={"input": {"turn_detection": None}})
    assert config.vad_settings() is None, "null turns turn detection off"
    opts = config.options()
    assert opts.max_new_tokens == 42 and opts.sampling.temperature == 0 and opts.speech.enabled and opts.speech.greedy
    create = config.create_request()
    assert create.mode == omni_pb2.VOICE_MODE_AUDIO_ROLEPLAY and create.options == opts
    override = config.options(ResponseFields(output_modalities=["text"], max_output_tokens="inf", temperature=0.7))
    assert (
        not override.speech.enabled
        and override.max_new_tokens == 0
        and override.sampling.temperature == pytest.approx(0.7)
    )
    with pytest.raises(InvalidParam, match="fixed once"):
        update(config, started=True, audio={"output": {"voice": "omni"}})
    assert not update(config, started=True, output_modalities=["text"]).options().speech.enabled


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"max_output_tokens": 10**6}, LimitExceeded),
        ({"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.05}}}}, VadSettingsError),
        ({"audio": {"output": {"reference_voice": {"data": "AAAA", "format": "wav"}}}}, InvalidParam),
        ({"model": "gpt-realtime"}, UnknownModel),
    ],
)
def test_refused_session_updates_change_nothing(fields, error):
    config = SessionConfig()
    with pytest.raises(error):
        update(config, output_modalities=["text"], **fields)
    assert config == SessionConfig()


# --- the realtime input path ----------------------------------------------------------------------------------------


def ramp(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n) / 1e6).astype(np.float32)


def test_input_goes_in_whole_seconds_in_order_and_held_audio_is_trimmed():
    async def run():
        calls: list[omni_pb2.AppendUnitRequest] = []
        errors: list[BaseException] = []

        async def append(req):
            calls.append(req)
            await asyncio.sleep(0)

        sender = InputSender(append, errors.append, max_held_s=5)
        sender.add_audio(ramp(0, 12000))  # 0.75 s: stays here
        await sender.drained()
        assert calls == [] and sender.unsent_samples == 12000
        sender.add_frame(b"frame-1")
        sender.add_audio(ramp(12000, 24000))  # 2.25 s in all: two whole seconds go, with the frame
        sender.add_text("typed")
        await sender.drained()
        assert len(calls) == 1  # merged while in order: audio and frame, then the text last
        np.testing.assert_array_equal(np.frombuffer(calls[0].audio.pcm, "<f4"), ramp(0, 32000))
        assert [f.data for f in calls[0].frames] == [b"frame-1"] and calls[0].text == "typed"
        sender.seal()  # a commit: the partial second too
        await sender.drained()
        np.testing.assert_array_equal(np.frombuffer(calls[1].audio.pcm, "<f4"), ramp(32000, 4000))
        sender.hold()  # the model answers: nothing goes in
        sender.add_audio(ramp(36000, 32000))
        await sender.drained()
        assert len(calls) == 2
        sender.release(keep_from=36000 + 16000)  # keep from where the user's speech began
        await sender.drained()
        np.testing.assert_array_equal(np.frombuffer(calls[2].audio.pcm, "<f4"), ramp(52000, 16000))
        sender.add_audio(ramp(68000, 100))
        assert sender.clear() == 100 and sender.end == 68100
        assert errors == []

    asyncio.run(run())


def test_a_failed_send_is_reported_and_later_input_still_goes():
    async def run():
        sent, errors = [], []

        async def append(req):
            if not sent:
                sent.append(None)
                raise InvalidParam("bad frame")
            sent.append(req)

        sender = InputSender(append, errors.append, max_held_s=5)
        sender.add_frame(b"x")
        sender.seal()
        await sender.drained()
        sender.add_audio(ramp(0, SR))
        await sender.drained()
        return sent, errors

    sent, errors = asyncio.run(run())
    assert [str(e) for e in errors] == ["bad frame"] and len(sent) == 2 and sent[1].audio.pcm
