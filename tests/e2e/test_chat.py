"""Offline chat over a real gRPC channel: text, image + text, audio + text with speech, video units, and the
greedy answer of the pipeline against the same request run in one process."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.minicpmo.v1 import omni_pb2
from services.client.sdk import audio, generation_options, image, text, user, video
from services.gateway.prompts import (
    AudioRef,
    ImageRef,
    Message,
    PlaceholderSettings,
    build_chat_prompt,
)
from tests.e2e.media import image_bytes, wav

pytestmark = [pytest.mark.ray, pytest.mark.redis]


def test_health_and_reflection(served, client):
    assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert client.health("minicpmo.v1.MiniCPMO") == health_pb2.HealthCheckResponse.SERVING
    assert client.health("no.such.Service") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # the current status comes at once
    watch.cancel()
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"minicpmo.v1.MiniCPMO", "grpc.health.v1.Health"} <= names
    # reflection also serves the descriptors, so grpcurl-like tools can call the API without the .proto files
    req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="minicpmo.v1.MiniCPMO")
    reply = list(stub.ServerReflectionInfo(iter([req])))[0]
    assert reply.file_descriptor_response.file_descriptor_proto


def test_text_chat_streams_deltas_and_final(client):
    events = list(client.chat_stream([user(text("Hello! Who are you?"))], max_new_tokens=16, greedy=True))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "final" and kinds.count("final") == 1
    final = events[-1].final
    assert final.finish_reason in (omni_pb2.FINISH_REASON_STOP, omni_pb2.FINISH_REASON_LENGTH)
    assert 1 <= final.usage.completion_tokens == len(final.token_ids) <= 16
    assert final.usage.prompt_tokens > 0
    assert "".join(e.text_delta for e in events if e.WhichOneof("event") == "text_delta") == final.text
    assert final.timings.time_to_first_token_ms > 0 and final.timings.total_ms >= final.timings.time_to_first_token_ms


def in_process_greedy(model_dir: str, messages: list[Message], images: list[bytes], clips: list[np.ndarray], n: int):
    """The same chat run in this process with the components alone (no Ray, no gRPC): upstream `chat` greedy."""
    from services.audio_encoder.encoder import AudioEmbedder
    from services.common.generation import GREEDY
    from services.common.image_layout import ImageProcessorConfig
    from services.gateway.tokenizer import SpecialTokens, load_tokenizer
    from services.llm_core.generate import generate_solo
    from services.llm_core.model import load_llm_model
    from services.vision_encoder.encoder import ImageEmbedder

    tok = load_tokenizer(model_dir)
    sp = SpecialTokens.from_tokenizer(tok)
    settings = PlaceholderSettings.chat(ImageProcessorConfig.from_model_dir(model_dir))
    prompt = build_chat_prompt(messages, tok, settings=settings)
    model = load_llm_model(model_dir)
    pieces = []
    if images:
        rows = torch.cat([e.embeddings for e in ImageEmbedder.from_checkpoint(model_dir).encode(images)])
        pieces += _spread(prompt.image_bounds, rows)
    if clips:
        rows = torch.cat(AudioEmbedder.from_checkpoint(model_dir).encode(clips))
        pieces += _spread(prompt.audio_bounds, rows)
    embeds = model.embed(torch.tensor(prompt.input_ids), pieces)
    return generate_solo(model, embeds, GREEDY.with_(max_new_tokens=n), [sp.im_end, sp.endoftext]).ids


def _spread(bounds, rows):
    out, pos = [], 0
    for s, e in bounds:
        out.append((s, e, rows[pos : pos + e - s]))
        pos += e - s
    assert pos == rows.shape[0]
    return out


def test_greedy_pipeline_equals_in_process(served, client, golden):
    img = image_bytes(golden, "image_big.png")
    clip = wav(golden, "speech.wav")
    question = "Describe the picture and the sound."
    answer = client.chat([user(image(img), audio(clip), text(question))], max_new_tokens=12, greedy=True)
    import io

    from PIL import Image

    size = Image.open(io.BytesIO(img)).size
    msgs = [Message("user", [ImageRef(size), AudioRef(len(clip)), question])]
    expected = in_process_greedy(served.model_dir, msgs, [img], [clip], 12)
    assert answer.token_ids == expected


def test_image_text_chat(client, golden):
    img = image_bytes(golden, "image_small.png")
    with_image = client.chat([user(image(img), text("What is in the image?"))], max_new_tokens=8, greedy=True)
    text_only = client.chat([user(text("What is in the image?"))], max_new_tokens=8, greedy=True)
    assert with_image.final.usage.prompt_tokens > text_only.final.usage.prompt_tokens
    assert with_image.final.usage.completion_tokens >= 1


def test_audio_chat_with_speech_streams_24khz_chunks(client, golden):
    opts = generation_options(
        max_new_tokens=40, min_new_tokens=40, greedy=True, speech=True,
        speech_output=omni_pb2.SPEECH_OUTPUT_BOTH, speech_greedy=True,
    )  # fmt: skip
    answer = client.chat([user(audio(wav(golden, "speech.wav")), text("Answer aloud."))], options=opts)
    assert len(answer.chunks) >= 2, "speech must stream in several chunks"
    assert all(c.sample_rate == 24000 for c in answer.chunks)
    assert [c.index for c in answer.chunks] == list(range(len(answer.chunks)))
    pcm = answer.audio
    assert pcm.size > 0 and np.isfinite(pcm).all() and np.abs(pcm).max() <= 1.5
    for c in answer.chunks:
        assert list(c.codes.shape)[1:] == [4] and c.codes.shape[0] >= 1
    final = answer.final
    assert final.usage.audio_seconds == pytest.approx(pcm.size / 24000, rel=1e-3)
    assert final.usage.speech_codes == sum(c.codes.shape[0] for c in answer.chunks)
    assert 0 < final.timings.time_to_first_audio_ms <= final.timings.total_ms


def test_video_chat_as_units(client, golden):
    frames = [image_bytes(golden, "image_unit0.png"), image_bytes(golden, "image_unit1.png")]
    answer = client.chat([user(video(frames, wav(golden, "unit_audio_2s.wav")), text("What happened?"))],
                         max_new_tokens=6, greedy=True)  # fmt: skip
    assert answer.final.usage.completion_tokens >= 1


def test_codes_only_speech_has_no_pcm(client):
    opts = generation_options(max_new_tokens=20, min_new_tokens=20, greedy=True, speech=True,
                              speech_output=omni_pb2.SPEECH_OUTPUT_CODES, speech_greedy=True)  # fmt: skip
    answer = client.chat([user(text("Say something."))], options=opts)
    assert answer.chunks and all(not c.pcm and c.codes.shape[0] >= 1 for c in answer.chunks)


def test_chat_error_codes_and_replicas_keep_serving(served, client):
    from services.client.sdk import MiniCPMOClient

    cases = [
        ([user(image(b"\x89PNG\r\n\x1a\n corrupt"), text("x"))], {}, grpc.StatusCode.INVALID_ARGUMENT),
        ([user(audio(np.zeros(0, np.float32)), text("x"))], {}, grpc.StatusCode.INVALID_ARGUMENT),
        ([user(text("x"))], {"max_new_tokens": 10**6}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([user(text("word " * 20000))], {}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([], {}, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for messages, kw, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            client.chat(messages, **kw)
        assert err.value.code() == code, err.value.details()
        assert err.value.details()
    with MiniCPMOClient(served.target, api_key=None) as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.chat([user(text("x"))], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with MiniCPMOClient(served.target, api_key="not-a-key") as stranger:
        with pytest.raises(grpc.RpcError) as err:
            stranger.chat([user(text("x"))], max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = client.chat([user(text("Still there?"))], max_new_tokens=4, greedy=True)
    assert after.final.usage.completion_tokens >= 1
