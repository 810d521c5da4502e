"""Ray Serve deployment `LLMCore`: the Qwen2 backbone behind the batching engine, one KV cache per session.

Requests carry token ids + placeholder spans; the encoder outputs arrive beside them as the encoders' own
response messages (the gateway passes the encoders' DeploymentResponses straight in, so embeddings travel
encoder -> LLMCore without a detour through the gateway). Here they are spliced into the token embeddings.

Live sessions (`log=True`): the replica holds the session's KV under a Redis lease (fencing epoch). Every
prefill goes into the session's replay log first (the exact embeddings, so a rebuild needs no encoder and
reproduces the KV), every answer's fed tokens after it ends. A replica that gets a session it did not build
(the owner died, the router moved it, the engine evicted it) rebuilds the KV from the log before serving, so
the conversation continues as if nothing happened. One-shot chats (`ephemeral`) never touch Redis.

Retries are idempotent: a logged request carries the gateway's `request_id`, kept in its replay entry's meta, so
a replica that already holds it (see `OwnedSessions`) answers a retry from what it recorded - a prefill's KV
length, an answer's tokens - instead of applying it a second time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import torch
from google.protobuf.message import Message
from ray import serve

from protos.minicpmo.v1 import audio_pb2, llm_pb2, tensor_pb2, vision_pb2
from services.common.routing import SessionAffinityReplica, affinity_router_config
from services.common.tensor_codec import from_proto, to_proto
from services.gateway import metrics
from services.gateway.sessions import ReplayEntry, SessionLimitExceeded, SessionNotFound
from services.gateway.stage import OwnedSessions, limit_threads, replica_dtype, session_store


class SpanMismatch(ValueError):
    """Encoder outputs that do not fill the prompt's placeholders."""


class DuplicateRequest(RuntimeError):
    """A retry that arrived while its original answer is still running on this replica."""


_ANSWERING = "answering"  # `OwnedSessions.applied` value of an answer that has not been logged yet


def _rows(pieces: Sequence[Message]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Image rows and audio rows, in prompt order, from the encoders' response messages."""
    image, audio = [], []
    for p in pieces:
        if isinstance(p, vision_pb2.EncodeImagesResponse):
            image += [from_proto(i.embeddings) for i in p.images]
        elif isinstance(p, audio_pb2.EncodeAudioResponse):
            audio += [from_proto(e) for e in p.embeddings]
        elif isinstance(p, audio_pb2.EncodeChunkResponse):
            audio.append(from_proto(p.embeddings))
        else:
            raise TypeError(f"unexpected encoder output {type(p).__name__}")
    return image, audio


def _fill(spans: Sequence[llm_pb2.Span], rows: list[torch.Tensor], what: str) -> list[tuple[int, int, torch.Tensor]]:
    """Fill the spans in order from the concatenated rows (upstream's chunk_input fill)."""
    have = sum(r.shape[0] for r in rows)
    need = sum(s.end - s.start for s in spans)
    if have != need:
        raise SpanMismatch(f"{what} placeholders need {need} rows, the encoders gave {have}")
    if not spans:
        return []
    flat = torch.cat(rows)
    out, pos = [], 0
    for s in spans:
        out.append((s.start, s.end, flat[pos : pos + s.end - s.start]))
        pos += s.end - s.start
    return out


def _embeds_entry(kind: str, embeds: torch.Tensor, meta: dict | None = None) -> ReplayEntry:
    return ReplayEntry(kind, embeds.shape[0], to_proto(embeds).SerializeToString(), meta or {})


def _ids_entry(kind: str, ids: Sequence[int]) -> ReplayEntry:
    return ReplayEntry(kind, len(ids), to_proto(torch.tensor(list(ids), dtype=torch.long)).SerializeToString())


@serve.deployment(
    name="LLMCore",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    request_router_config=affinity_router_config(),
)
class LLMCore(SessionAffinityReplica):
    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        redis_url: str | None = None,
        kv_budget_tokens: int = 65536,
        max_batch_tokens: int = 2048,
        max_session_tokens: int = 8192,
        session_ttl_s: int = 600,
    ):
        from services.gateway.tokenizer import SpecialTokens, load_tokenizer
        from services.llm_core.engine.engine import LLMEngine
        from services.llm_core.model import load_llm_model

        limit_threads()
        sp = SpecialTokens.from_tokenizer(load_tokenizer(model_dir))
        self.model = load_llm_model(model_dir, device=device, dtype=replica_dtype(device))
        self.engine = LLMEngine(
            self.model, kv_budget_tokens, max_batch_tokens, stop_ids=[sp.im_end, sp.endoftext],
            max_session_tokens=max_session_tokens, on_evict=self._evicted,
        )  # fmt: skip
        self.engine.start()
        self.store = (
            session_store(redis_url, ttl_s=session_ttl_s, max_tokens=max_session_tokens) if redis_url else None
        )
        self.owned = OwnedSessions(self.store, "llm", self.engine.drop) if self.store else None

    def _evicted(self, session_id: str) -> None:
        if self.owned is not None:  # rebuilt from the log on its next request
            self.owned.discard(session_id)

    def embed(self, inp: llm_pb2.PrefillInput, pieces: Sequence[Message]) -> torch.Tensor:
        image, audio = _rows(pieces)
        splice = _fill(inp.image_spans, image, "image") + _fill(inp.audio_spans, audio, "audio")
        return self.model.embed(torch.tensor(list(inp.input_ids), dtype=torch.long), splice)

    async def _ensure_session(self, session_id: str):
        """The session's fence; rebuilds its KV from the replay log if this replica's copy is missing or stale."""
        if self.store is None:
            raise RuntimeError("LLMCore was started without redis_url: live sessions are unavailable")
        fence, rebuild = await self.owned.fence(session_id, self.engine.has_session(session_id))
        if rebuild:
            with metrics.stage_timer("llm_rebuild"):
                self.engine.drop(session_id)
                self.owned.discard(session_id)
                for entry in await self.store.replay(session_id):
                    if entry.kind in ("prefill", "prefix"):
                        embeds = from_proto(tensor_pb2.Tensor.FromString(entry.payload))
                    elif entry.kind == "answer":
                        embeds = self.model.embed_tokens(from_proto(tensor_pb2.Tensor.FromString(entry.payload)))
                    else:  # other stages' entries (streaming audio chunks)
                        continue
                    kv_len = (await self.engine.prefill(session_id, embeds)).kv_len
                    rid = entry.meta.get("request_id", "")
                    # a prefill answers with its KV length; an answer (its prefix entry) with what it streamed
                    self.owned.record(session_id, rid, kv_len if entry.kind == "prefill" else entry.meta)
            self.owned.built(session_id, fence.epoch)
        return fence

    async def Prefill(self, request: llm_pb2.PrefillRequest, *pieces: Message) -> llm_pb2.PrefillResponse:
        embeds = self.embed(request.input, pieces)
        sid = request.session_id
        with metrics.stage_timer("llm_prefill"):
            if not request.log:
                if request.reset:
                    self.engine.drop(sid)
                return llm_pb2.PrefillResponse(kv_len=(await self.engine.prefill(sid, embeds)).kv_len)
            rid = request.request_id
            async with self.owned.lock(sid):
                fence = await self._ensure_session(sid)
                done = self.owned.result(sid, rid)
                if done is not None:  # a retry of a prefill the session already holds
                    return llm_pb2.PrefillResponse(kv_len=done)
                # The log is the truth: write it first (fenced, limit-checked), then the KV.
                entry = _embeds_entry("prefill", embeds, {"request_id": rid})
                try:
                    await self.store.append_replay(sid, entry, fence=fence)
                    result = await self.engine.prefill(sid, embeds)
                except (SessionLimitExceeded, SessionNotFound):
                    raise  # refused before anything was written: KV and log still agree
                except BaseException:
                    self.owned.forget(sid)  # the log may hold what the KV lacks: rebuild on the next request
                    raise
                self.owned.record(sid, rid, result.kv_len)
        metrics.QUEUE_DEPTH.set(self.engine.stats()["queue_depth"], tags={"stage": "llm"})
        return llm_pb2.PrefillResponse(kv_len=result.kv_len)

    async def Generate(self, request: llm_pb2.GenerateRequest, *pieces: Message) -> AsyncIterator[llm_pb2.GenerateEvent]:
        from services.common.generation import SamplingParams

        s = request.sampling
        params = SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty,
            min_new_tokens=s.min_new_tokens, max_new_tokens=s.max_new_tokens, greedy=s.greedy,
            seed=s.seed if s.HasField("seed") else None,
        )  # fmt: skip
        embeds = self.embed(request.input, pieces)
        sid = request.session_id
        fence = kv_before = None
        if request.ephemeral:
            self.engine.drop(sid)
        elif request.log:
            async with self.owned.lock(sid):
                fence = await self._ensure_session(sid)
                done = self.owned.result(sid, request.request_id)
                if done is None:
                    record = await self.store.get(sid)
                    room = self.store.max_tokens - record.tokens - embeds.shape[0]
                    if room < 1:
                        raise SessionLimitExceeded(
                            f"session {sid} holds {record.tokens} of {self.store.max_tokens} tokens: no room for an "
                            "answer; close it and start a new session"
                        )
                    self.owned.record(sid, request.request_id, _ANSWERING)  # until _log_answer settles it
            if done == _ANSWERING:
                raise DuplicateRequest(f"answer {request.request_id} of session {sid} is still running")
            if done is not None:  # a retry of an answer the session already holds: stream the logged one again
                for msg in _logged_answer(done, embeds.shape[0]):
                    yield msg
                return
            params = params.with_(max_new_tokens=min(params.max_new_tokens, room))
            kv_before = self.engine.kv_len(sid) or 0
        spk = request.spk_position if request.spk_position >= 0 else None
        generated: list[int] = []
        kv_after = finish = None
        first = True
        try:
            async for ev in self.engine.generate(sid, embeds, params, spk_position=spk):
                msg = llm_pb2.GenerateEvent()
                if ev.token_id is not None:
                    msg.token_ids.append(ev.token_id)
                    generated.append(ev.token_id)
                if first:
                    msg.prompt_tokens = embeds.shape[0]
                    if ev.spk_hidden is not None:
                        msg.spk_hidden.CopyFrom(to_proto(ev.spk_hidden.float()))
                    first = False
                if ev.finish_reason is not None:
                    finish = ev.finish_reason
                    msg.stop = _STOP[finish]
                    msg.kv_len = kv_after = ev.kv_len
                yield msg
        finally:
            if request.ephemeral:
                self.engine.drop(sid)
            elif fence is not None:
                kv_now = self.engine.kv_len(sid) if kv_after is None else kv_after
                await self._log_answer(sid, fence, request.request_id, embeds, generated, finish, kv_before, kv_now)

    async def _log_answer(
        self, sid, fence, rid: str, prefix: torch.Tensor, generated: list[int], finish, kv_before: int, kv_now
    ) -> None:
        """Log what the answer put into the KV: the prefix and the fed ids (all but the last, as upstream).
        The prefix entry's meta also keeps what the answer streamed, for a retry of the same request id."""
        fed = (kv_now or 0) - kv_before - prefix.shape[0]
        if kv_now is None or fed < 0:  # the answer never got its prefix in: nothing to log, state is unchanged
            self.owned.unrecord(sid, rid)
            return
        meta = {"request_id": rid, "tokens": generated, "stop": finish or "interrupted", "kv_len": kv_now}
        entries = [_embeds_entry("prefix", prefix, meta)]
        if fed:
            entries.append(_ids_entry("answer", generated[:fed]))
        try:
            await self.store.append_replay(sid, entries, fence=fence)
        except BaseException:
            self.owned.forget(sid)  # KV and log disagree now: rebuild from the log on the next request
            raise
        self.owned.record(sid, rid, meta)

    async def Interrupt(self, request: llm_pb2.SessionRef) -> llm_pb2.InterruptReply:
        return llm_pb2.InterruptReply(was_generating=self.engine.interrupt(request.session_id))

    async def Drop(self, request: llm_pb2.SessionRef) -> llm_pb2.DropReply:
        if self.owned is not None:
            self.owned.discard(request.session_id)
        return llm_pb2.DropReply(dropped=self.engine.drop(request.session_id))

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("LLM engine loop is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def _logged_answer(meta: dict, prompt_tokens: int) -> list[llm_pb2.GenerateEvent]:
    """The events of an answer already in the replay log (its `<|spk|>` hidden state is not kept)."""
    events = [llm_pb2.GenerateEvent(token_ids=[t]) for t in meta["tokens"]] or [llm_pb2.GenerateEvent()]
    events[0].prompt_tokens = prompt_tokens
    events[-1].stop = _STOP[meta["stop"]]
    events[-1].kv_len = meta["kv_len"]
    return events


_STOP = {
    "stop": llm_pb2.STOP_REASON_EOS,
    "length": llm_pb2.STOP_REASON_LENGTH,
    "interrupted": llm_pb2.STOP_REASON_INTERRUPTED,
}
