"""Ray Serve deployment `LLMCore`: the Qwen2 backbone behind the batching engine, one KV cache per session.

Requests carry token ids + placeholder spans; the encoder outputs arrive beside them as the encoders' own
`Embeddings` replies (the gateway hands the encoders' in-flight responses straight in, so embeddings travel
encoder -> LLMCore without a detour through the gateway). Here they are spliced into the token embeddings.

Live sessions: the replica holds the session's KV under the "llm" lease. Every prefill goes into the session's
replay log first (the exact embeddings, so a rebuild needs no encoder and reproduces the KV), every answer
after it ends; a replica that gets a session it did not build (the owner died, the router moved it, the engine
evicted it) rebuilds the KV from the log before serving (`services.runtime.session_stage.SessionStage`), so the
conversation continues as if nothing happened. One-shot chats (`ephemeral`) never touch Redis.

Rolling context (`context_window.py` chooses what stays): when a live session's KV reaches its window, a
trimmed KV is built BESIDE the live one (under a temporary engine session, while the session's units go on
into the live KV); then, under the session's lock, what arrived meanwhile is added to it too, the replay log in
Redis is rewritten to exactly the trimmed content plus those entries, and the engine switches the session to the
new KV. So the session never stalls for a rebuild, its KV stays bounded, and so does its log in Redis.

Admission (`admission.py`; sessions are safe from each other): a session the replica takes on (new, moved here,
or rebuilt) is promised its whole `max_session_tokens` of KV arena up front, and is taken on only if a roll's worth
stays unpromised. So another session's growth never makes its units fail, and some roll can always be built: a
roll that finds no room waits for one in flight, which hands its room back when it switches. A session the arena
cannot promise is refused at once (RESOURCE_EXHAUSTED, at CreateSession). A session keeps its room until it closes
or expires (`session_ttl_s` without a call): one that only paused (its units parked behind its roll, or its user
silent) must not lose its place to a newcomer. A one-shot chat is promised its prompt plus its longest answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import torch
from ray import serve

from protos.minicpmo.v1 import llm_pb2, replay_pb2, tensor_pb2
from services.common.generation import SamplingParams
from services.common.tensor_codec import from_proto, to_proto
from services.llm_core.admission import AdmissionPolicy
from services.llm_core.context_window import WindowPolicy, embeddings, retained
from services.llm_core.engine import EXISTING, EngineFullError, LLMEngine, Reservation, SessionStateError
from services.llm_core.engine.cuda_graphs import KERNEL_BLOCK
from services.llm_core.model import load_llm_model
from services.runtime import metrics
from services.runtime.autoscaling import SESSION_LOAD
from services.runtime.direct import DirectReplica
from services.runtime.errors import InvalidArgument, Unavailable
from services.runtime.ownership import Fence, OwnershipStore, SessionLimitExceeded
from services.runtime.replica import limit_threads, replica_dtype, reports_startup
from services.runtime.routing import SessionAffinityReplica, replica_id
from services.runtime.session_stage import SessionStage

METRICS_PERIOD_S = 5.0
ROLL_WAITS_FOR_ANSWER_S = 5.0  # the longest a context roll waits for a streaming answer before it switches
IMAGE = tensor_pb2.Embeddings.MODALITY_IMAGE
AUDIO = tensor_pb2.Embeddings.MODALITY_AUDIO
log = logging.getLogger("ray.serve")
_ANSWERING = "answering"  # record of an answer that has not ended (and is not logged) yet
_STOP = {"stop": llm_pb2.STOP_REASON_EOS, "length": llm_pb2.STOP_REASON_LENGTH,
         "interrupted": llm_pb2.STOP_REASON_INTERRUPTED}  # fmt: skip


class SpanMismatch(InvalidArgument):
    """Encoder outputs that do not fill the prompt's placeholders."""


class DuplicateRequest(Unavailable):
    """A retry that arrived while its original answer is still running on this replica (retry later)."""


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


def sampling_params(s: llm_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, repetition_penalty=s.repetition_penalty,
        min_new_tokens=s.min_new_tokens, max_new_tokens=s.max_new_tokens, greedy=s.greedy,
        seed=s.seed if s.HasField("seed") else None,
    )  # fmt: skip


def _beside(session_id: str) -> str:
    """The engine session a context roll of `session_id` is built in."""
    return f"{session_id}#window"


def _answer_events(answer: replay_pb2.LoggedAnswer, prompt_tokens: int) -> list[llm_pb2.GenerateEvent]:
    """The events of an answer already in the replay log (its `<|spk|>` hidden state is not kept)."""
    events = [llm_pb2.GenerateEvent(token_ids=[t]) for t in answer.streamed_ids] or [llm_pb2.GenerateEvent()]
    events[0].prompt_tokens = prompt_tokens
    events[-1].stop = answer.stop
    events[-1].kv_len = answer.kv_len
    return events


@serve.deployment(name="LLMCore")
class LLMCore(SessionStage, DirectReplica, SessionAffinityReplica):
    role = "llm"
    direct_methods = {"Prefill": llm_pb2.PrefillRequest}

    @reports_startup
    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        redis_url: str | None = None,
        kv_budget_tokens: int = 65536,
        max_batch_tokens: int = 2048,
        max_session_tokens: int = 8192,
        session_ttl_s: int = 600,
        context_window_tokens: int = 6144,
        context_keep_tokens: int = 3072,
    ):
        limit_threads()
        self.window = WindowPolicy(context_window_tokens, context_keep_tokens)
        self.admission = AdmissionPolicy(kv_budget_tokens, max_session_tokens, self.window, KERNEL_BLOCK)
        self.model = load_llm_model(model_dir, device=device, dtype=replica_dtype(device))
        self.max_session_tokens = max_session_tokens
        # stop ids come with each request; only a session idle past its TTL (expired: the sweep drops it too) is
        # evicted for room, and an evicted session has no state: its next request rebuilds it
        self.engine = LLMEngine(self.model, kv_budget_tokens, max_batch_tokens, stop_ids=(),
                                max_session_tokens=max_session_tokens, evict_after_s=session_ttl_s)  # fmt: skip
        self.engine.start()
        store = OwnershipStore.from_url(redis_url, ttl_s=session_ttl_s, max_tokens=max_session_tokens) if redis_url else None
        super().__init__(store, replica_id())
        log.info("LLMCore takes on %d live sessions of up to %d tokens (kv_budget_tokens %d)",
                 self.admission.live_sessions, max_session_tokens, kv_budget_tokens)  # fmt: skip
        self._rolling: dict[str, asyncio.Task] = {}
        self._answering: dict[str, asyncio.Event] = {}  # sessions whose answer streams now, set once it is logged
        self._roll_again_at: dict[str, int] = {}  # KV length below which a roll that saved little is not retried
        self._built: set[str] = set()  # sessions whose KV this replica built: their requests need it to exist
        self._reporter: asyncio.Task | None = None

    def _report(self) -> None:
        stats = self.engine.stats()
        metrics.QUEUE_DEPTH.set(stats["queue_depth"], tags={"stage": "llm"})
        metrics.KV_TOKENS.set(stats["kv_tokens_used"])
        metrics.KV_SESSIONS.set(stats["sessions"])
        metrics.KV_FREE_TOKENS.set(stats["kv_tokens_free"])
        metrics.LIVE_SESSION_CAPACITY.set(self.admission.live_sessions)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: the session load the autoscaling policy scales on, and the direct
        calls in flight (which Serve does not count)."""
        load = self.admission.session_load(self.engine.stats()["kv_tokens_promised"])
        return {SESSION_LOAD: load, **self.direct_stats()}

    def _start_reporting(self) -> None:
        if self._reporter is None:
            self._reporter = asyncio.create_task(metrics.report_every(METRICS_PERIOD_S, self._report))

    def embed(self, inp: llm_pb2.PrefillInput, encoded: Sequence[tensor_pb2.Embeddings]) -> torch.Tensor:
        image = [from_proto(t) for e in encoded if e.modality == IMAGE for t in e.items]
        audio = [from_proto(t) for e in encoded if e.modality == AUDIO for t in e.items]
        splice = _fill(inp.image_spans, image, "image") + _fill(inp.audio_spans, audio, "audio")
        return self.model.embed(torch.tensor(list(inp.input_ids), dtype=torch.long), splice)

    # --- live prefill -------------------------------------------------------------------------------------------

    async def Prefill(self, request: llm_pb2.PrefillRequest, *encoded: tensor_pb2.Embeddings) -> llm_pb2.PrefillResponse:
        self._start_reporting()
        embeds = self.embed(request.input, encoded)
        sid, rid = request.session_id, request.request_id
        if not 0 <= request.close_tokens + request.open_tokens <= embeds.shape[0]:
            raise InvalidArgument("close_tokens + open_tokens must fit in the prefill's input")
        entry = replay_pb2.ReplayEntry(
            request_id=rid,
            llm_tokens=embeds.shape[0],
            prefill=replay_pb2.LoggedPrefill(
                kind=request.kind, close_tokens=request.close_tokens, open_tokens=request.open_tokens,
                embeddings=to_proto(embeds),
            ),
        )  # fmt: skip
        await self._after_roll_if_full(sid, embeds.shape[0])
        with metrics.stage_timer("llm_prefill"):
            # overlap: the forward runs while the entry goes to Redis (the KV never gets ahead of the log outside
            # the session's lock; `services.runtime.session_stage` step 4)
            kv_len = await self._evicted_retried(
                lambda: self.log_then_apply(sid, rid, lambda: entry, lambda _: self._prefill(sid, embeds), overlap=True)
            )
        self._maybe_roll(sid)
        return llm_pb2.PrefillResponse(kv_len=kv_len)

    async def _prefill(self, sid: str, embeds: torch.Tensor) -> int:
        kv_len = (await self.engine.prefill(sid, embeds, expected_kv_len=self._expected(sid),
                                            reservation=self.admission.live())).kv_len
        self._built.add(sid)
        return kv_len

    def _expected(self, sid: str) -> int:
        """What a request of `sid` expects of the engine: the KV this replica built (which the engine may have
        evicted since: the request then fails with SessionStateError instead of starting the session over), or
        none yet."""
        return EXISTING if sid in self._built else 0

    @staticmethod
    async def _evicted_retried(call: Callable[[], Awaitable[int]]) -> int:
        """`call()`, once more if the engine had evicted the session's KV: the failure made the stage forget the
        session, so the second call rebuilds it from the log (which may already hold this request: then the
        rebuild answers it)."""
        try:
            return await call()
        except SessionStateError:
            return await call()

    # --- answers ------------------------------------------------------------------------------------------------

    async def Generate(
        self, request: llm_pb2.GenerateRequest, *encoded: tensor_pb2.Embeddings
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        self._start_reporting()
        params = sampling_params(request.sampling)
        embeds = self.embed(request.input, encoded)
        sid, rid = request.session_id, request.request_id
        if request.ephemeral:
            self.engine.drop(sid)
            promise = self.admission.chat(embeds.shape[0], params.max_new_tokens)
            try:
                async for msg in self._stream(sid, embeds, params, request, promise):
                    yield msg
            finally:
                self.engine.drop(sid)
            return
        await self._after_roll_if_full(sid, embeds.shape[0])
        # Evicted by the engine after the stage's check (`_expected`): nothing was streamed yet, and the failure
        # left no state, so the answer runs once more and its `owned` rebuilds the session from the log.
        streamed = False
        try:
            async for msg in self._answer(sid, rid, embeds, params, request):
                streamed = True
                yield msg
        except SessionStateError:
            if streamed:
                raise
            async for msg in self._answer(sid, rid, embeds, params, request):
                yield msg

    async def _answer(
        self, sid: str, rid: str, embeds: torch.Tensor, params: SamplingParams, request: llm_pb2.GenerateRequest
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        async with self.owned(sid) as fence:
            done = self.result(sid, rid)
            if done is None:
                room = self.max_session_tokens - (self.engine.kv_len(sid) or 0) - embeds.shape[0]
                if room < 1:
                    raise SessionLimitExceeded(
                        f"session {sid} is full ({self.engine.kv_len(sid)} tokens): no room for an answer; "
                        "close it and start a new session"
                    )
                self.record(sid, rid, _ANSWERING)  # until _log_answer settles it
                self._answering[sid] = answered = asyncio.Event()  # a roll switches only once it is logged
                kv_before = self.engine.kv_len(sid) or 0
        if done == _ANSWERING:
            raise DuplicateRequest(f"answer {rid} of session {sid} is still running; retry when it ends")
        if done is not None:  # a retry of an answer the session already holds: stream the logged one again
            for msg in _answer_events(done, embeds.shape[0]):
                yield msg
            return
        params = params.with_(max_new_tokens=min(params.max_new_tokens, room))
        generated: list[int] = []
        finish: list[llm_pb2.GenerateEvent] = []
        try:
            async for msg in self._stream(sid, embeds, params, request, self.admission.live(), self._expected(sid)):
                generated += msg.token_ids
                if msg.stop:
                    finish.append(msg)
                yield msg
        finally:
            kv_now = finish[0].kv_len if finish else self.engine.kv_len(sid)
            stop = finish[0].stop if finish else llm_pb2.STOP_REASON_INTERRUPTED
            try:
                await self._log_answer(fence, rid, embeds, generated, stop, kv_before, kv_now)
            finally:
                self._answering.pop(sid, None)
                answered.set()

    async def _stream(
        self, sid: str, embeds: torch.Tensor, params: SamplingParams, request: llm_pb2.GenerateRequest,
        reservation: Reservation, expected_kv_len: int | None = None,
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        spk = request.spk_position if request.spk_position >= 0 else None
        first = True
        async for ev in self.engine.generate(sid, embeds, params, spk_position=spk, stop_ids=request.stop_ids,
                                             expected_kv_len=expected_kv_len, reservation=reservation):  # fmt: skip
            msg = llm_pb2.GenerateEvent()
            if ev.token_id is not None:
                msg.token_ids.append(ev.token_id)
            if first:
                msg.prompt_tokens = embeds.shape[0]
                if ev.spk_hidden is not None:
                    msg.spk_hidden.CopyFrom(to_proto(ev.spk_hidden.float()))
                first = False
            if ev.finish_reason is not None:
                msg.stop = _STOP[ev.finish_reason]
                msg.kv_len = ev.kv_len
            yield msg

    async def _log_answer(
        self, fence: Fence, rid: str, prefix: torch.Tensor, generated: list[int], stop: int, kv_before: int,
        kv_now: int | None,
    ) -> None:
        """Log what the answer put into the KV: the prefix and the fed ids (all but the last, as upstream)."""
        sid = fence.session_id
        fed = (kv_now or 0) - kv_before - prefix.shape[0]
        if kv_now is None or fed < 0:  # the answer never got its prefix in: nothing to log, state is unchanged
            self.unrecord(sid, rid)
            return
        answer = replay_pb2.LoggedAnswer(
            prefix_embeddings=to_proto(prefix), fed_ids=generated[:fed], streamed_ids=generated, stop=stop,
            kv_len=kv_now,
        )  # fmt: skip
        await self.append_logged(fence, [replay_pb2.ReplayEntry(request_id=rid, llm_tokens=kv_now - kv_before, answer=answer)])
        self.record(sid, rid, answer)
        self._maybe_roll(sid)

    # --- rolling context ----------------------------------------------------------------------------------------

    async def _after_roll_if_full(self, sid: str, tokens: int) -> None:
        """Input that would take the session past its hard limit while its context rolls waits for the roll, and goes
        into the trimmed KV: a client that sends units faster than the roll is built (a recording fed faster than
        real time) is slowed down, not refused. Outside the session's lock, which the roll's switch takes."""
        rolling = self._rolling.get(sid)
        if rolling is not None and (self.engine.kv_len(sid) or 0) + tokens > self.max_session_tokens:
            await asyncio.shield(rolling)  # a cancelled caller leaves the roll running

    def _maybe_roll(self, sid: str) -> None:
        kv = self.engine.kv_len(sid) or 0
        if self.window.full(kv) and sid not in self._rolling and kv >= self._roll_again_at.get(sid, 0):
            self._rolling[sid] = asyncio.create_task(self._roll(sid))

    async def _roll(self, sid: str) -> None:
        """Build the trimmed KV beside the live one, catch it up, rewrite the log, switch (module doc)."""
        try:
            async with self.owned(sid) as fence:
                entries = await self._store().log(sid, self.role)
            keep = retained(entries, self.window)
            kept = sum(e.llm_tokens for e in keep)
            if kept > self.engine.kv_len(sid) - (self.window.window_tokens - self.window.keep_tokens) // 4:
                # the turn in progress holds nearly everything (typed text is never dropped): nothing to gain now
                self._roll_again_at[sid] = self.window.window_tokens + kept
                return
            with metrics.stage_timer("llm_roll"):
                built = 0
                for entry in keep:  # live units keep going into the session's own KV meanwhile
                    built = await self._prefill_beside(sid, entry, built)
                if not await self._switch(sid, fence, entries, keep, built):
                    return
            metrics.CONTEXT_ROLLS.inc()
            self._roll_again_at.pop(sid, None)
        except Exception as e:  # the session goes on with its full KV; the next growth tries again
            log.warning("context roll of %s failed: %s", sid, e)
        finally:
            self.engine.drop(_beside(sid))
            self._rolling.pop(sid, None)

    async def _switch(
        self, sid: str, fence: Fence, entries: list[replay_pb2.ReplayEntry], keep: list[replay_pb2.ReplayEntry],
        built: int,
    ) -> bool:
        """Under the session's lock: catch the roll's KV up with the log written since `entries` were read, rewrite
        the log to what it holds, switch the session to it (True). False when the session moved or was rebuilt
        meanwhile (checked, not acquired: a roll must not take back a session a scale-up moved elsewhere). An answer
        streams outside the lock: while one runs, the switch waits for it to be logged, instead of failing on the
        busy session and throwing the roll's work away; but not for longer than `ROLL_WAITS_FOR_ANSWER_S`, since the
        roll's KV holds the replica's room for rolls meanwhile (a failed roll is tried again at the next growth)."""
        while True:
            async with self._locked(sid):
                held = self._held_fence(sid)
                if held is None or held.epoch != fence.epoch or not await self._store().check(fence):
                    return False
                answering = self._answering.get(sid)
                if answering is None:
                    caught_up = (await self._store().log(sid, self.role))[len(entries) :]
                    for entry in caught_up:
                        built = await self._prefill_beside(sid, entry, built)
                    await self._store().rewrite(sid, fence, keep + caught_up)
                    self.engine.replace_session(sid, _beside(sid))
                    return True
            try:
                await asyncio.wait_for(answering.wait(), ROLL_WAITS_FOR_ANSWER_S)
            except TimeoutError:
                raise TimeoutError(f"an answer still streamed after {ROLL_WAITS_FOR_ANSWER_S} s") from None

    async def _prefill_beside(self, sid: str, entry: replay_pb2.ReplayEntry, built: int) -> int:
        """One entry into the roll's KV, which holds `built` rows (so an eviction of it fails the roll instead of
        starting it over). The first entry is promised a roll's room; without room, the roll waits for a roll in
        flight to switch (admission keeps one roll's room free: with none in flight, it fails, and the session's next
        growth tries again)."""
        rows = embeddings(entry, self.model.embed_tokens)
        while True:
            try:
                result = await self.engine.prefill(_beside(sid), rows, expected_kv_len=built,
                                                   reservation=self.admission.roll())  # fmt: skip
                return result.kv_len
            except EngineFullError:
                building = [t for s, t in self._rolling.items() if s != sid and self.engine.has_session(_beside(s))]
                if built or not building:
                    raise
                await asyncio.wait(building, return_when=asyncio.FIRST_COMPLETED)

    async def Interrupt(self, request: llm_pb2.SessionRef) -> llm_pb2.InterruptReply:
        return llm_pb2.InterruptReply(was_generating=self.engine.interrupt(request.session_id))

    async def Drop(self, request: llm_pb2.SessionRef) -> llm_pb2.DropReply:
        dropped = self.has_state(request.session_id)
        self.forget(request.session_id)
        return llm_pb2.DropReply(dropped=dropped)

    # --- SessionStage -------------------------------------------------------------------------------------------

    def has_state(self, session_id: str) -> bool:
        return self.engine.has_session(session_id)

    def drop_state(self, session_id: str) -> None:
        self.engine.drop(session_id)
        self._built.discard(session_id)
        self._roll_again_at.pop(session_id, None)

    async def rebuild(self, session_id: str, entries: Sequence[replay_pb2.ReplayEntry]) -> dict:
        results: dict = {}
        with metrics.stage_timer("llm_rebuild"):
            for entry in entries:
                kv_len = await self._prefill(session_id, embeddings(entry, self.model.embed_tokens))
                results[entry.request_id] = kv_len if entry.HasField("prefill") else entry.answer
        if entries:
            metrics.REBUILDS.inc(tags={"stage": "llm"})
        return results

    def check_health(self) -> None:
        """Unhealthy (Serve replaces the replica) when the engine loop stopped or its numerics canary moved: a
        replica that can no longer compute correct results must not keep serving."""
        if not self.engine.is_alive():
            raise RuntimeError("LLM engine loop is not running")
        self.engine.check_numerics()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
