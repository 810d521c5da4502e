"""`LLMEngine`: many sessions on one replica, their prefills and decode steps batched into shared forward passes.

Why not transformers' own continuous batching (`generate_batch` / `init_continuous_batching`, 5.23): its requests
are token-id prompts that live for one generation, while we need (1) `inputs_embeds` prompts (vision and audio
embeddings spliced in), (2) a session KV that persists across many prefills and answers (live units arrive
every second, answers continue the same KV), (3) the last-layer hidden state at `<|spk|>` for the speech
decoder, (4) interrupting one answer while keeping its KV consistent, and (5) per-session eviction and rebuild.
Its paged cache and manager are built around request lifetimes, so this is a small nano-vllm-style engine
instead: `kv_cache` (the KV arena: one contiguous run per session), `scheduler` (what runs each step), `runner`
(the batch through the model's own forward), `attention` / `cuda_graphs` (attention backends reading the arena in
place), `services.llm_core.sampling` (one batched sampler pass), and this loop.

Threading: one background thread runs the steps; the asyncio API hands work in under a lock and gets results
back through `loop.call_soon_threadsafe`. All session state changes happen under that lock; the forward pass
runs outside it (under a forward lock that the numerics canary also takes), and results of requests that were
interrupted or dropped meanwhile are discarded.

Failures stay with their request: a row whose logits come out non-finite fails only its own request
(`NonFiniteScoresError`, INTERNAL; that step's rows are not added to its KV) while the other rows of the step go
on, and so does a prefill whose last hidden state is non-finite; an exception in a whole step fails that step's
requests only. Embeddings are not checked on the way in: NaN from an encoder is a server fault (INTERNAL), not
the caller's, and it fails exactly the request that carries it.

KV semantics, as upstream's `llm.generate`: after an answer ends (stop id, max_new_tokens, interrupt), the
session's KV holds everything prefilled + the generated ids except the last one (that id was never fed back).
The next user turn therefore starts with `<|im_end|>` (or `<|tts_eos|><|im_end|>` after an interrupt), which the
caller's prompt prefixes already carry. A caller rebuilding an evicted session replays the prefills and the fed
ids (`GenEvent.kv_len` after each answer tells how many rows the session holds).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.generation import SamplingParams
from services.llm_core.engine.attention import SeqSpan
from services.llm_core.engine.cuda_graphs import KERNEL_BLOCK
from services.llm_core.engine.kv_cache import NO_RESERVATION, KVAllocator, KVArena, Reservation
from services.llm_core.engine.runner import ForwardBatch, ModelRunner
from services.llm_core.engine.scheduler import PrefillChunk, Request, ScheduledBatch, Scheduler, SessionStateError
from services.llm_core.model import LLMModel
from services.llm_core.sampling import NON_FINITE, NonFiniteScoresError, sample_next
from services.runtime.errors import FailedPrecondition, Internal, InvalidArgument

CANARY_TOKENS = 8  # rows of the fixed prompt `check_numerics` runs (then one decode row)


class EngineInputError(InvalidArgument):
    """Malformed input to the engine (wrong embedding shape, spk position outside the prefix)."""


class SessionDroppedError(SessionStateError):
    """The session was dropped while this request was queued or running."""


class SessionBusyError(FailedPrecondition):
    """The session has queued or running work, and the operation needs it idle."""


class NumericsCheckError(Internal):
    """The canary forward gave non-finite results, or results that differ from start-up's: the replica's weights or
    device went bad."""


@dataclass
class PrefillResult:
    kv_len: int  # session KV rows after this prefill
    last_hidden: torch.Tensor  # (D,) last-layer hidden state (after the final norm) of the last prefilled row


@dataclass
class GenEvent:
    token_id: int | None  # None only on the closing event of an interrupted answer
    index: int  # position of the token in the answer
    kv_len: int  # session KV rows now (the newest token is not in it yet)
    finish_reason: str | None = None  # "stop" | "length" | "interrupted" on the last event
    spk_hidden: torch.Tensor | None = None  # (D,) on the first event when spk_position was given


@dataclass(eq=False)
class _Prefill:
    embeds: torch.Tensor
    deliver: Callable[[Any], None]  # PrefillResult or Exception, into the caller's event loop
    last_hidden: torch.Tensor | None = None


@dataclass(eq=False)
class _Generate:
    embeds: torch.Tensor
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: tuple[int, ...]
    spk_position: int | None
    deliver: Callable[[Any], None]  # GenEvent or Exception
    generated: list[int] = field(default_factory=list)
    spk_hidden: torch.Tensor | None = None


def _threadsafe_sink(loop: asyncio.AbstractEventLoop, put: Callable[[Any], None]) -> Callable[[Any], None]:
    def deliver(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(put, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is waiting for this result
            pass

    return deliver


class LLMEngine:
    def __init__(
        self,
        model: LLMModel,
        kv_budget_tokens: int,
        max_batch_tokens: int = 512,
        *,
        stop_ids: Sequence[int],
        block_size: int = KERNEL_BLOCK,
        max_session_tokens: int | None = None,
        evict_idle: bool = True,
        evict_after_s: float = 0.0,
        on_evict: Callable[[str], None] | None = None,
        cuda_graph_max_rows: int = 64,
    ):
        """`kv_budget_tokens`: size of the KV arena (rounded up to whole blocks of `block_size` tokens; on CUDA
        `block_size` must be a multiple of the flex kernel's block, 128). `stop_ids`: the default stop ids of
        answers. `evict_idle`, `evict_after_s`: when the arena is full, evict sessions that have had no work for that
        long (they are rebuilt from their replay log). `cuda_graph_max_rows`: decode steps of up to this many
        sessions replay CUDA graphs (CUDA only; 0 = always eager)."""
        cfg = model.cfg
        self.model = model
        self.device = model.device_
        self.hidden_size = cfg.hidden_size
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        if self.device.type == "cuda" and block_size % KERNEL_BLOCK:
            raise ValueError(f"block_size must be a multiple of {KERNEL_BLOCK} on CUDA (got {block_size})")
        num_blocks = -(-kv_budget_tokens // block_size)
        max_session_tokens = max_session_tokens or cfg.max_position_embeddings
        self.kv = KVAllocator(num_blocks, block_size, max_session_tokens)
        self.arena = KVArena(
            cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, model.dtype,
            self.device,
        )  # fmt: skip
        self.scheduler = Scheduler(self.kv, max_batch_tokens, max_session_tokens, evict_idle, evict_after_s)
        self.runner = ModelRunner(model, self.arena, cuda_graph_max_rows)
        self.on_evict = on_evict
        self._forward_lock = threading.Lock()  # one forward at a time: engine steps and the numerics canary
        self._canary_reference = self._canary_logits()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0
        self.mixed_steps = 0  # steps that carried prefill rows and decode rows together
        self.last_batch_tokens = 0

    # --- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def is_alive(self) -> bool:
        """The step loop is running (for health checks)."""
        return self._thread is not None and self._thread.is_alive()

    # --- public API -------------------------------------------------------------------------------------------

    async def prefill(
        self,
        session_id: str,
        inputs_embeds: torch.Tensor,
        *,
        expected_kv_len: int | None = None,
        reservation: Reservation = NO_RESERVATION,
    ) -> PrefillResult:
        """Append `inputs_embeds` (T, D) to the session's KV (creating the session if new).

        `expected_kv_len`: the KV length the caller believes the session has (0 = new session); a mismatch
        (evicted, dropped, replica replaced) raises `SessionStateError` so the caller can rebuild first.
        `reservation`: what the session is promised if this request creates it (`EngineFullError` if the arena
        cannot promise it).
        """
        embeds = self._check_embeds(inputs_embeds)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PrefillResult] = loop.create_future()

        def put(item: Any) -> None:
            if not fut.done():
                fut.set_exception(item) if isinstance(item, BaseException) else fut.set_result(item)

        self._submit(session_id, embeds, False, _Prefill(embeds, _threadsafe_sink(loop, put)), expected_kv_len,
                     reservation)  # fmt: skip
        return await fut

    async def generate(
        self,
        session_id: str,
        inputs_embeds: torch.Tensor,
        params: SamplingParams,
        spk_position: int | None = None,
        *,
        expected_kv_len: int | None = None,
        stop_ids: Sequence[int] | None = None,
        reservation: Reservation = NO_RESERVATION,
    ) -> AsyncIterator[GenEvent]:
        """Prefill the assistant prefix `inputs_embeds` (T, D), then yield the answer's tokens one by one.

        The first event carries the last-layer hidden state at row `spk_position` of the prefix (`<|spk|>`).
        The last event has a `finish_reason`. Leaving the iteration early interrupts the answer. `stop_ids`: this
        answer's stop ids (default: the engine's). A row whose logits come out non-finite ends the stream with
        `NonFiniteScoresError`. `reservation`: as for `prefill`.
        """
        embeds = self._check_embeds(inputs_embeds)
        if spk_position is not None and not 0 <= spk_position < embeds.shape[0]:
            raise EngineInputError(f"spk_position {spk_position} outside the prefix of {embeds.shape[0]} rows")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        work = _Generate(
            embeds=embeds,
            params=params,
            generator=params.make_generator(self.device),
            stop_ids=tuple(sorted(self.stop_ids if stop_ids is None else {int(i) for i in stop_ids})),
            spk_position=spk_position,
            deliver=_threadsafe_sink(loop, queue.put_nowait),
        )
        req = self._submit(session_id, embeds, True, work, expected_kv_len, reservation)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                with self._cv:
                    self._interrupt_request(req)

    def interrupt(self, session_id: str) -> bool:
        """Stop the session's answer at the next step (its stream ends with finish_reason "interrupted").

        Returns False when the session has no answer queued or running.
        """
        with self._cv:
            hit = False
            for r in self.scheduler.queued(session_id):
                if r.decode and not r.finished:
                    self._interrupt_request(r)
                    hit = True
            return hit

    def drop(self, session_id: str) -> bool:
        """Forget the session and free its KV; its queued or running requests fail with SessionDroppedError."""
        with self._cv:
            existed = self.kv.has(session_id) or bool(self.scheduler.queued(session_id))
            for r in self.scheduler.drop(session_id):
                r.payload.deliver(SessionDroppedError(f"session {session_id!r} was dropped"))
            return existed

    def has_session(self, session_id: str) -> bool:
        with self._cv:
            return self.kv.has(session_id)

    def kv_len(self, session_id: str) -> int | None:
        """Committed KV rows of the session, None if it has no KV here."""
        with self._cv:
            return self.kv.num_tokens(session_id) if self.kv.has(session_id) else None

    def replace_session(self, target_id: str, source_id: str) -> int:
        """Make `source_id`'s KV the KV of `target_id`, atomically; target's old KV (if any) is gone (its run stays
        target's when it can hold the new rows, `KVAllocator.rename`), and so is `source_id`. For switching to a context rebuilt or trimmed beside the live one. Both sessions must
        be idle (no queued or running request: `SessionBusyError`); returns target's KV length now.
        """
        with self._cv:
            if target_id == source_id:
                raise EngineInputError(f"replace_session needs two different sessions (got {target_id!r} twice)")
            busy = [sid for sid in (target_id, source_id) if not self.scheduler.is_idle(sid)]
            if busy:
                raise SessionBusyError(f"session {busy[0]!r} has queued or running work; replace it when idle")
            if not self.kv.has(source_id):
                raise SessionStateError(f"session {source_id!r} has no KV on this replica")
            self.kv.rename(source_id, target_id)
            return self.kv.num_tokens(target_id)

    def check_numerics(self) -> None:
        """Run a fixed tiny forward (8 prompt rows, 1 decode row, on the replica's model and device) and raise
        `NumericsCheckError` if its logits are non-finite or differ from the ones computed at start-up. Waits for
        the step in flight, if any (a health check of a hung engine hangs too)."""
        now = self._canary_logits()
        ref = self._canary_reference
        if not torch.isfinite(now).all():
            raise NumericsCheckError("numerics canary: the model's logits are not finite (weights or device bad)")
        err = (now - ref).abs().max().item()
        if err > 1e-3 * max(1.0, ref.abs().max().item()):
            raise NumericsCheckError(f"numerics canary: logits moved by {err:.3g} since start-up (weights or device bad)")

    def stats(self) -> dict[str, int]:
        """Counters and gauges: sessions, queue, KV tokens (used = committed rows, promised = admitted sessions'
        runs, reserved = held blocks, free = blocks nobody holds), evictions and KV moves so far, steps."""
        with self._cv:
            s = self.scheduler.stats()
            kv = self.kv
            return {
                "sessions": len(kv.sessions()),
                "active": s["decoding"] + s["prefilling"],
                "decoding": s["decoding"],
                "queue_depth": s["waiting"],
                "kv_tokens_used": kv.used_tokens,
                "kv_tokens_promised": kv.promised_tokens,
                "kv_tokens_reserved": (kv.num_blocks - kv.free_blocks) * kv.block_size,
                "kv_tokens_free": kv.free_blocks * kv.block_size,
                "kv_tokens_budget": kv.capacity_tokens,
                "kv_moves": kv.moves,
                "evictions": self.scheduler.evictions,
                "steps": self.steps,
                "mixed_steps": self.mixed_steps,
                "last_batch_tokens": self.last_batch_tokens,
            }

    # --- submission -------------------------------------------------------------------------------------------

    def _check_embeds(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.hidden_size or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise EngineInputError(f"inputs_embeds must be (T >= 1, {self.hidden_size}), got {shape}")
        return x.detach().to(device=self.device, dtype=self.model.dtype)

    @torch.inference_mode()
    def _canary_logits(self) -> torch.Tensor:
        """Logits (2, V) of the fixed canary: a solo forward of ids 1..8, then a decode row, on the CPU."""
        ids = torch.arange(1, CANARY_TOKENS + 1) % self.model.vocab_size
        with self._forward_lock:
            cache = self.model.new_cache()
            prompt, _ = self.model.step(self.model.embed_tokens(ids), cache, last_only=True)
            decode, _ = self.model.step(self.model.embed_tokens(ids[:1]), cache)
        return torch.cat([prompt, decode]).cpu()

    def _submit(
        self,
        session_id: str,
        embeds: torch.Tensor,
        decode: bool,
        work: Any,
        expected_kv_len: int | None,
        reservation: Reservation,
    ) -> Request:
        if self._thread is None:
            raise RuntimeError("LLMEngine.start() was not called")
        with self._cv:
            req = self.scheduler.add(session_id, embeds.shape[0], decode, work, expected_kv_len, reservation)
            self._cv.notify()
        return req

    def _interrupt_request(self, r: Request) -> None:
        """Under the lock. A decoding answer ends now; one still prefilling its prefix ends when that is in."""
        if r.finished:
            return
        if r.prefilling:
            r.stopping = True
        else:
            self._finish(r, None, "interrupted")

    # --- the loop ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not self.scheduler.has_work():
                    self._cv.wait()
                if not self._running:
                    self._fail_all(RuntimeError("LLM engine stopped"))
                    return
                batch = self.scheduler.schedule()
                for r, err in batch.failed:
                    r.payload.deliver(err)
            for sid in batch.evicted:
                if self.on_evict is not None:
                    self.on_evict(sid)
            if batch:
                self._step(batch)

    def _step(self, batch: ScheduledBatch) -> None:
        try:
            with self._cv:
                fwd = self._build(batch)
                kv_ops = self.kv.pop_ops()  # moves and zeroings decided while scheduling (or by drops)
            with self._forward_lock:
                self.arena.apply(kv_ops)
                logits, hidden = self.runner.forward(fwd)
            with self._cv:
                self._apply(batch, logits, hidden)
                self.steps += 1
                self.mixed_steps += bool(batch.decodes and batch.prefills)
                self.last_batch_tokens = batch.num_tokens
        except Exception as e:  # a failing step must not take the replica down: fail its requests only
            with self._cv:
                for r in [*batch.decodes, *(c.request for c in batch.prefills)]:
                    if not r.finished:
                        self.scheduler.finish(r)
                        r.payload.deliver(e)

    def _fail_all(self, error: Exception) -> None:
        """Under the lock: fail every queued or running request (engine shutdown)."""
        for r in self.scheduler.abort_all():
            r.payload.deliver(error)

    def _build(self, batch: ScheduledBatch) -> ForwardBatch:
        """Under the lock: the packed rows, positions and arena spans of a scheduled batch."""
        kv = self.kv
        embeds: list[torch.Tensor] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        logit_rows: list[int] = []
        hidden_rows: list[int] = []
        if batch.decodes:
            embeds.append(self.runner.embed_ids([r.payload.generated[-1] for r in batch.decodes]))
        for i, r in enumerate(batch.decodes):
            n = kv.num_tokens(r.session_id)
            positions.append(n)
            spans.append(SeqSpan(i, 1, kv.offset(r.session_id), n))
            logit_rows.append(i)
        row = len(positions)
        for c in batch.prefills:
            r = c.request
            embeds.append(r.payload.embeds[c.start : c.start + c.n])
            positions += range(c.kv_start, c.kv_start + c.n)
            spans.append(SeqSpan(row, c.n, kv.offset(r.session_id), c.kv_start))
            if c.last:
                (logit_rows if r.decode else hidden_rows).append(row + c.n - 1)
            spk = getattr(r.payload, "spk_position", None)
            if spk is not None and c.start <= spk < c.start + c.n:
                hidden_rows.append(row + spk - c.start)
            row += c.n
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)
        return ForwardBatch(
            embeds=torch.cat(embeds),
            positions=as_long(positions),
            spans=spans,
            num_decodes=len(batch.decodes),
            logit_rows=as_long(logit_rows),
            hidden_rows=as_long(hidden_rows),
        )

    def _apply(self, batch: ScheduledBatch, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """Under the lock: commit the KV rows, deliver prefill results, sample and emit answer tokens."""
        logit_i = hidden_i = 0
        to_sample: list[tuple[Request, int, PrefillChunk | None]] = []  # (request, its logits row, its chunk)
        for r in batch.decodes:
            if not r.finished:  # finished meanwhile (interrupt/drop): its row is never committed
                to_sample.append((r, logit_i, None))
            logit_i += 1
        for c in batch.prefills:
            r, work = c.request, c.request.payload
            spk = getattr(work, "spk_position", None)
            if c.last and not r.decode:
                work.last_hidden = hidden[hidden_i]
                hidden_i += 1
            if spk is not None and c.start <= spk < c.start + c.n:
                work.spk_hidden = hidden[hidden_i].clone()
                hidden_i += 1
            row = logit_i if c.last and r.decode else None
            logit_i += row is not None
            if r.finished:
                continue
            if row is not None and not r.stopping:
                to_sample.append((r, row, c))  # committed once its logits are known to be finite
                continue
            self.scheduler.commit_prefill(c)
            if not c.last:
                continue
            if not r.decode:
                self.scheduler.finish(r)
                if torch.isfinite(work.last_hidden).all():
                    work.deliver(PrefillResult(self.kv.num_tokens(r.session_id), work.last_hidden.clone()))
                else:
                    work.deliver(NonFiniteScoresError(
                        f"the model produced non-finite hidden states (NaN or inf) for this prefill (session "
                        f"{r.session_id!r}); its KV is not usable: drop or rebuild the session"
                    ))  # fmt: skip
            else:  # interrupted while its prefix went in
                self._finish(r, None, "interrupted")
        if to_sample:
            self._sample(to_sample, logits)

    def _sample(self, items: list[tuple[Request, int, PrefillChunk | None]], logits: torch.Tensor) -> None:
        rows = [i for _, i, _ in items]
        # usually every decode row, in order: a view, no copy of (rows, vocab) logits
        picked = logits[: len(rows)] if rows == list(range(len(rows))) else logits[torch.tensor(rows)]
        works: list[_Generate] = [r.payload for r, _, _ in items]
        ids = sample_next(
            picked,
            [w.params for w in works],
            [w.generated for w in works],
            [w.generator for w in works],
            stop_ids=[w.stop_ids for w in works],
        ).tolist()  # the step's one wait for the device
        for (r, _, chunk), w, tok in zip(items, works, ids):
            if tok == NON_FINITE:
                self.scheduler.finish(r)
                w.deliver(NonFiniteScoresError(
                    f"the model produced non-finite scores (NaN or inf logits) for this request (session "
                    f"{r.session_id!r}); this step's rows were not added to its KV"
                ))  # fmt: skip
                continue
            if chunk is not None:
                self.scheduler.commit_prefill(chunk)
            else:
                self.scheduler.commit_decode(r)
            w.generated.append(tok)
            kv = self.kv.num_tokens(r.session_id)
            if tok in w.stop_ids:
                self._finish(r, tok, "stop")
            elif len(w.generated) >= w.params.max_new_tokens or kv + 1 > self.scheduler.max_session_tokens:
                self._finish(r, tok, "length")
            else:
                w.deliver(self._event(r, tok, None))

    def _event(self, r: Request, tok: int | None, reason: str | None) -> GenEvent:
        w: _Generate = r.payload
        first = len(w.generated) == 1 and tok is not None
        return GenEvent(
            token_id=tok,
            index=len(w.generated) - 1 if tok is not None else len(w.generated),
            kv_len=self.kv.num_tokens(r.session_id),
            finish_reason=reason,
            spk_hidden=w.spk_hidden if first else None,
        )

    def _finish(self, r: Request, tok: int | None, reason: str) -> None:
        self.scheduler.finish(r)
        r.payload.deliver(self._event(r, tok, reason))
