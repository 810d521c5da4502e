"""Offline chat (upstream `chat`): the whole conversation in one request, one answer streamed back.

Images and audio go to their encoders at once; the prompt is built here from the images' header sizes and the
audio lengths alone (no need to wait for the encoders); the encoders' in-flight responses are handed straight to
LLMCore, which splices them in (embeddings never pass through the gateway).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import torch

from protos.minicpmo.v1 import audio_pb2, llm_pb2, omni_pb2, vision_pb2
from services.common.generation import CHAT_DEFAULTS
from services.common.tensor_codec import to_proto
from services.gateway.answer import Answer
from services.gateway.prompts import PlaceholderSettings, build_chat_prompt
from services.gateway.requests import LimitExceeded, ParsedChat, parse_chat, sampling_params
from services.gateway.stages import Piece
from services.gateway.context import GatewayContext, prefill_input, sampling_msg


def encode_offline(ctx: GatewayContext, parsed: ParsedChat) -> list[Piece]:
    """Start the encoders (concurrently); their in-flight responses go straight to LLMCore."""
    pieces = []
    if parsed.images:
        req = vision_pb2.EncodeImagesRequest(images=parsed.images, max_slice_nums=parsed.max_slice_nums or 0)
        pieces.append(ctx.stages.encode_images(req))
    if parsed.clips:
        clips = audio_pb2.EncodeAudioRequest(clips=[to_proto(torch.from_numpy(c)) for c in parsed.clips])
        pieces.append(ctx.stages.encode_audio(clips))
    return pieces


async def chat(ctx: GatewayContext, request: omni_pb2.ChatRequest) -> AsyncIterator[omni_pb2.ChatEvent]:
    speech = request.options.speech.enabled
    params = sampling_params(request.options, CHAT_DEFAULTS, ctx.limits)
    parsed = parse_chat(request, ctx.limits, ctx.image_cfg)
    settings = PlaceholderSettings.chat(
        ctx.image_cfg, parsed.max_slice_nums, use_image_id=False if parsed.omni_input else None
    )
    prompt = build_chat_prompt(
        parsed.messages, ctx.tokenizer, omni_input=parsed.omni_input, use_tts_template=speech, settings=settings
    )
    if len(prompt) > ctx.limits.max_prompt_tokens:
        raise LimitExceeded(
            f"the prompt is {len(prompt)} tokens; the limit is {ctx.limits.max_prompt_tokens} (send less input)"
        )
    sid = f"chat-{uuid.uuid4().hex}"
    gen = llm_pb2.GenerateRequest(
        session_id=sid,
        input=prefill_input(prompt),
        sampling=sampling_msg(params),
        spk_position=prompt.spk_bounds[-1][0] if speech and prompt.spk_bounds else -1,
        ephemeral=True,
        stop_ids=ctx.special.stop_ids,
    )
    answer = Answer(ctx.stages, ctx.detokenizer, gen, encode_offline(ctx, parsed),
                    request.options.speech if speech else None, utterance_id=sid)  # fmt: skip
    async for event in answer.events():
        yield event
