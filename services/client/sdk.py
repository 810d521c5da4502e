"""Python client of the public `minicpmo.v1.MiniCPMO` gRPC API.

    client = MiniCPMOClient("127.0.0.1:9000", api_key="...")
    answer = client.chat([user(text("Describe this"), image(open("cat.jpg", "rb").read()))], speech=True)
    answer.text, answer.audio (float32 24 kHz), answer.final.timings

    sid = client.create_session().session_id
    client.append(sid, audio=pcm_chunk, sample_rate=16000, frames=[jpeg_bytes])
    for event in client.respond(sid): ...

Every call sends the API key (`x-api-key`) and, for session calls, `session_id` metadata so that the ingress
(HAProxy, or Ray Serve's proxy) routes them to the gateway replica that holds the session's partial unit.

Retries: calls that are safe to repeat (GetSession, Interrupt, CloseSession; Chat and Respond as long as no event
of the answer arrived) are retried, with back-off, when the server says UNAVAILABLE or when the gateway replica
serving them died (HAProxy resets the stream: CANCELLED "Received RST_STREAM"; Ray Serve's proxy reports INTERNAL
naming the dead actor). CreateSession and AppendUnit are not repeated: a repeat would create a second session or
feed the same audio twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.minicpmo.v1 import omni_pb2, omni_pb2_grpc

T = TypeVar("T")
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0, 4.0)  # ~12 s in all: a gateway replica's restart
_DEAD_GATEWAY = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "actor died", "Actor died",
                 "Actor is unavailable")  # the last: how it reads when the proxy reaches gateways over gRPC
# HAProxy (`services.app.serve_env`) resets the client's stream when the gateway replica under it dies: CANCELLED,
# which a client that did not cancel reads as a lost server. (A local cancel reads "Locally cancelled ...".)
_RESET_BY_SERVER = "Received RST_STREAM"


def retryable(err: grpc.RpcError) -> bool:
    """UNAVAILABLE, or a gateway replica that died under the call: the proxy's INTERNAL, or HAProxy's reset."""
    code, details = err.code(), err.details() or ""
    return (
        code == grpc.StatusCode.UNAVAILABLE
        or (code == grpc.StatusCode.INTERNAL and any(m in details for m in _DEAD_GATEWAY))
        or (code == grpc.StatusCode.CANCELLED and _RESET_BY_SERVER in details)
    )


def with_retries(call: Callable[[], T]) -> T:
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return call()
        except grpc.RpcError as e:
            if delay is None or not retryable(e):
                raise
            time.sleep(delay)  # back-off before repeating a call that is safe to repeat
    raise AssertionError("unreachable")


class RetryingStream(Iterator[T]):
    """A server stream repeated on a retryable failure as long as nothing of it arrived yet; `cancel()` cancels
    the call in flight (iterating on then raises CANCELLED, as a plain gRPC stream does)."""

    def __init__(self, call: Callable[[], Iterator[T]]):
        self._call = call
        self._delays = iter(RETRY_DELAYS_S)
        self._current = call()
        self._started = False

    def __next__(self) -> T:
        while True:
            try:
                item = next(self._current)
                self._started = True
                return item
            except grpc.RpcError as e:
                delay = next(self._delays, None)
                if self._started or delay is None or not retryable(e):
                    raise
                time.sleep(delay)  # back-off before repeating the stream
                self._current = self._call()

    def cancel(self) -> None:
        self._current.cancel()


def text(t: str) -> omni_pb2.ContentPart:
    return omni_pb2.ContentPart(text=t)


def image(data: bytes) -> omni_pb2.ContentPart:
    return omni_pb2.ContentPart(image=omni_pb2.Image(data=data))


def audio_msg(pcm: np.ndarray, sample_rate: int = 16000) -> omni_pb2.Audio:
    """float PCM -> Audio (float32); int16 arrays go as int16."""
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        return omni_pb2.Audio(pcm=pcm.astype("<i2").tobytes(), format=omni_pb2.SAMPLE_FORMAT_INT16, sample_rate=sample_rate)
    return omni_pb2.Audio(pcm=pcm.astype("<f4").tobytes(), format=omni_pb2.SAMPLE_FORMAT_FLOAT32, sample_rate=sample_rate)


def audio(pcm: np.ndarray, sample_rate: int = 16000) -> omni_pb2.ContentPart:
    return omni_pb2.ContentPart(audio=audio_msg(pcm, sample_rate))


def video(frames: Iterable[bytes], pcm: np.ndarray | None = None, sample_rate: int = 16000) -> omni_pb2.ContentPart:
    v = omni_pb2.Video(frames=[omni_pb2.Image(data=f) for f in frames])
    if pcm is not None and len(pcm):
        v.audio.CopyFrom(audio_msg(pcm, sample_rate))
    return omni_pb2.ContentPart(video=v)


def user(*parts: omni_pb2.ContentPart) -> omni_pb2.Message:
    return omni_pb2.Message(role=omni_pb2.ROLE_USER, content=parts)


def assistant(*parts: omni_pb2.ContentPart) -> omni_pb2.Message:
    return omni_pb2.Message(role=omni_pb2.ROLE_ASSISTANT, content=parts)


@dataclass
class Answer:
    """A whole answer collected from an event stream."""

    text: str = ""
    chunks: list[omni_pb2.AudioChunk] = field(default_factory=list)
    final: omni_pb2.FinalEvent | None = None

    @property
    def audio(self) -> np.ndarray:
        """The answer's speech (float32, 24 kHz), chunks joined."""
        parts = [np.frombuffer(c.pcm, dtype="<f4") for c in self.chunks if c.pcm]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    @property
    def token_ids(self) -> list[int]:
        return list(self.final.token_ids) if self.final else []

    @classmethod
    def collect(cls, events: Iterable[omni_pb2.ChatEvent], on_event=None) -> Answer:
        ans = cls()
        for ev in events:
            if on_event is not None:
                on_event(ev)
            kind = ev.WhichOneof("event")
            if kind == "text_delta":
                ans.text += ev.text_delta
            elif kind == "audio":
                ans.chunks.append(ev.audio)
            elif kind == "final":
                ans.final = ev.final
        return ans


class MiniCPMOClient:
    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        api_key: str | None = None,
        timeout_s: float | None = 300.0,
        application: str | None = None,
    ):
        """`application`: the Serve application to call when the proxy serves several (metadata `application`)."""
        self.channel = grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.stub = omni_pb2_grpc.MiniCPMOStub(self.channel)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.application = application

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> MiniCPMOClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _md(self, session_id: str | None = None) -> list[tuple[str, str]]:
        md = [("x-api-key", self.api_key)] if self.api_key else []
        if self.application:
            md.append(("application", self.application))
        if session_id:
            md.append(("session_id", session_id))
        return md

    # --- chat -----------------------------------------------------------------------------------------------------

    def chat_stream(self, messages: Iterable[omni_pb2.Message], **kw) -> Iterator[omni_pb2.ChatEvent]:
        req = chat_request(messages, **kw)
        return RetryingStream(lambda: self.stub.Chat(req, metadata=self._md(), timeout=self.timeout_s))

    def chat(self, messages: Iterable[omni_pb2.Message], on_event=None, **kw) -> Answer:
        return Answer.collect(self.chat_stream(messages, **kw), on_event)

    # --- live sessions --------------------------------------------------------------------------------------------

    def create_session(
        self,
        mode: int = omni_pb2.VOICE_MODE_OMNI,
        language: str = "en",
        reference_voice: np.ndarray | None = None,
        ref_sample_rate: int = 16000,
        options: omni_pb2.GenerationOptions | None = None,
        instructions: str = "",
    ) -> omni_pb2.SessionInfo:
        req = omni_pb2.CreateSessionRequest(mode=mode, language=language, instructions=instructions)
        if reference_voice is not None:
            req.reference_voice.CopyFrom(audio_msg(reference_voice, ref_sample_rate))
        if options is not None:
            req.options.CopyFrom(options)
        return self.stub.CreateSession(req, metadata=self._md(), timeout=self.timeout_s)

    def append(
        self,
        session_id: str,
        audio: np.ndarray | None = None,
        sample_rate: int = 16000,
        frames: Iterable[bytes] = (),
        text: str = "",
    ) -> omni_pb2.AppendUnitResponse:
        req = omni_pb2.AppendUnitRequest(session_id=session_id, frames=[omni_pb2.Image(data=f) for f in frames], text=text)
        if audio is not None:
            req.audio.CopyFrom(audio_msg(audio, sample_rate))
        return self.stub.AppendUnit(req, metadata=self._md(session_id), timeout=self.timeout_s)

    def respond_stream(self, session_id: str, options: omni_pb2.GenerationOptions | None = None):
        req = omni_pb2.RespondRequest(session_id=session_id)
        if options is not None:
            req.options.CopyFrom(options)
        return RetryingStream(lambda: self.stub.Respond(req, metadata=self._md(session_id), timeout=self.timeout_s))

    def respond(self, session_id: str, options: omni_pb2.GenerationOptions | None = None, on_event=None) -> Answer:
        return Answer.collect(self.respond_stream(session_id, options), on_event)

    def interrupt(self, session_id: str) -> omni_pb2.InterruptResponse:
        req = omni_pb2.InterruptRequest(session_id=session_id)
        return with_retries(lambda: self.stub.Interrupt(req, metadata=self._md(session_id), timeout=self.timeout_s))

    def close_session(self, session_id: str) -> None:
        req = omni_pb2.CloseSessionRequest(session_id=session_id)
        with_retries(lambda: self.stub.CloseSession(req, metadata=self._md(session_id), timeout=self.timeout_s))

    def get_session(self, session_id: str) -> omni_pb2.SessionInfo:
        req = omni_pb2.GetSessionRequest(session_id=session_id)
        return with_retries(lambda: self.stub.GetSession(req, metadata=self._md(session_id), timeout=self.timeout_s))

    # --- health ---------------------------------------------------------------------------------------------------

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s).status


def generation_options(
    max_new_tokens: int = 0,
    min_new_tokens: int = 0,
    greedy: bool = False,
    speech: bool = False,
    speech_output: int = omni_pb2.SPEECH_OUTPUT_AUDIO,
    speech_greedy: bool = False,
    seed: int | None = None,
    temperature: float | None = None,
) -> omni_pb2.GenerationOptions:
    opts = omni_pb2.GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    opts.sampling.greedy = greedy
    if seed is not None:
        opts.sampling.seed = seed
        opts.speech.seed = seed
    if temperature is not None:
        opts.sampling.temperature = temperature
    opts.speech.enabled = speech
    opts.speech.output = speech_output
    opts.speech.greedy = speech_greedy
    return opts


def chat_request(
    messages: Iterable[omni_pb2.Message],
    options: omni_pb2.GenerationOptions | None = None,
    voice_mode: int = omni_pb2.VOICE_MODE_UNSPECIFIED,
    language: str = "",
    reference_voice: np.ndarray | None = None,
    max_slice_nums: int = 0,
    **option_kw,
) -> omni_pb2.ChatRequest:
    req = omni_pb2.ChatRequest(messages=list(messages), voice_mode=voice_mode, language=language, max_slice_nums=max_slice_nums)
    req.options.CopyFrom(options if options is not None else generation_options(**option_kw))
    if reference_voice is not None:
        req.reference_voice.CopyFrom(audio_msg(reference_voice))
    return req
