"""The fuzz campaign against a running stack: hypothesis draws cases (`strategies.cases`), each is sent as its
key and session say, judged (`outcomes.judge` + what its key and session imply), and tallied; another key's
greedy chats run alongside the whole time; replica restarts are checked after every case.

Used by `tests/e2e/test_fuzz.py` (a bounded, reproducible run) and `python -m tests.fuzz.campaign` (a long one).
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed

from services.client.sdk import MiniCPMOClient, generation_options
from tests.fuzz.innocent import InnocentTraffic
from tests.fuzz.outcomes import Outcome, call, judge, metadata
from tests.fuzz.shrink import shrink
from tests.fuzz.strategies import Case, cases
from tests.replicas import changes, serve_actors
from tests.stack import ServedApp

UNKNOWN_KEY = "not-a-key-of-this-server"
SESSION_RPCS = ("AppendUnit", "Respond")
RECOVERY_TIMEOUT_S = 120.0
# The sessions the harness makes answer briefly when a Respond case sends no options of its own.
SESSION_OPTIONS = generation_options(max_new_tokens=4, greedy=True)
SHRINK_BUDGET = 60  # requests spent on minimising one finding


@dataclass
class Finding:
    """One kind of broken promise, with the smallest case that showed it."""

    signature: str
    count: int
    example: Case
    detail: str

    def as_dict(self) -> dict:
        return {"signature": self.signature, "count": self.count, "example": repr(self.example), "detail": self.detail}


@dataclass
class Report:
    examples: int = 0
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # rpc -> code -> n
    messages: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # "rpc code" -> message -> n
    findings: dict[str, Finding] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)
    cross_session_failures: list[str] = field(default_factory=list)
    innocent_answers: int = 0
    victim_problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def crashes(self) -> int:
        """Cases that broke a promise of the API (bad status, unhelpful message, stream cut short)."""
        return sum(f.count for f in self.findings.values())

    @property
    def clean(self) -> bool:
        return not (self.findings or self.restarts or self.cross_session_failures or self.victim_problems)

    def add(self, case: Case, outcome: Outcome, problems: list[str]) -> None:
        self.examples += 1
        self.statuses[case.rpc][outcome.code] += 1
        if not outcome.ok:
            self.messages[f"{case.rpc} {outcome.code}"][blank_numbers(outcome.message)[:120]] += 1
        for problem in problems:
            signature = signature_of(case, problem)
            seen = self.findings.get(signature)
            if seen is None:
                self.findings[signature] = Finding(signature, 1, case, problem)
            else:
                seen.count += 1
                if case.size < seen.example.size:
                    seen.example, seen.detail = case, problem

    def summary(self) -> str:
        codes = sorted({c for per_rpc in self.statuses.values() for c in per_rpc})
        lines = ["rpc            cases  " + "  ".join(codes)]
        for rpc, per_rpc in sorted(self.statuses.items()):
            row = "  ".join(f"{per_rpc.get(c, 0):>{len(c)}}" for c in codes)
            lines.append(f"{rpc:<14} {sum(per_rpc.values()):>5}  {row}")
        lines += [
            f"crashes (broken promises): {self.crashes}",
            f"replica restarts: {len(self.restarts)}",
            f"cross-session failures: {len(self.cross_session_failures)} (of {self.innocent_answers} innocent answers)",
            f"victim session changed: {len(self.victim_problems)}",
            f"wall {self.wall_s:.1f} s, cpu (this process) {self.cpu_s:.1f} s",
        ]
        for f in self.findings.values():
            lines.append(f"- {f.signature} [{f.count}x], smallest: {f.example!r}")
        lines += [f"- restart: {r}" for r in self.restarts]
        lines += [f"- cross-session: {c}" for c in self.cross_session_failures]
        lines += [f"- victim: {v}" for v in self.victim_problems]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "statuses": {rpc: dict(c) for rpc, c in self.statuses.items()},
            "top_messages": {k: dict(c.most_common(5)) for k, c in sorted(self.messages.items())},
            "crashes": self.crashes,
            "replica_restarts": len(self.restarts),
            "cross_session_failures": len(self.cross_session_failures),
            "innocent_answers": self.innocent_answers,
            "findings": [f.as_dict() for f in self.findings.values()],
            "restarts": self.restarts,
            "cross_session": self.cross_session_failures,
            "victim": self.victim_problems,
            "wall_s": round(self.wall_s, 1),
            "cpu_s": round(self.cpu_s, 1),
        }


def blank_numbers(text: str) -> str:
    """`text` with its numbers and addresses blanked out, so messages that differ only there group together."""
    return re.sub(r"\d+", "N", re.sub(r"0x[0-9a-fA-F]+", "ADDR", text))


def signature_of(case: Case, problem: str) -> str:
    """A finding's kind: the RPC and the problem, numbers blanked."""
    return f"{case.rpc}: " + blank_numbers(problem)[:160]


class Fuzzer:
    """Sends cases with the first key of the app; the second key owns the victim session and the innocent chats."""

    def __init__(self, app: ServedApp):
        self.app = app
        self.own = MiniCPMOClient(app.target, api_key=app.keys[0])
        self.other = MiniCPMOClient(app.target, api_key=app.keys[1])
        self.victim = self.other.create_session(options=SESSION_OPTIONS)
        self.report = Report()
        self.actors = serve_actors()

    def close(self) -> None:
        self.other.close_session(self.victim.session_id)
        self.own.close()
        self.other.close()

    def run(self, case: Case) -> Outcome:
        """Send the case and record what came back (and any replica restart) in the report."""
        outcome, problems = self.attempt(case)
        self._check_replicas(case)
        self.report.add(case, outcome, problems)
        return outcome

    def attempt(self, case: Case) -> tuple[Outcome, list[str]]:
        """Send the case; what came back and the promises it broke."""
        api_key = {"own": self.app.keys[0], "none": None, "unknown": UNKNOWN_KEY}[case.key]
        request = copy.deepcopy(case.request)
        own_session = None
        session_id = ""
        if case.rpc in SESSION_RPCS:
            if case.session == "own":
                try:
                    own_session = self.own.create_session(options=SESSION_OPTIONS).session_id
                except grpc.RpcError as e:
                    problem = f"creating the case's session failed: {e.details()!r}"
                    return Outcome(e.code().name, e.details() or ""), [problem]
            session_id = {
                "own": own_session, "victim": self.victim.session_id, "unknown": uuid.uuid4().hex, "empty": "",
                "garbage": "../\u00e9\u2028 *",
            }[case.session]  # fmt: skip
            request.session_id = session_id
        outcome = call(self.own.channel, case.rpc, request, metadata(api_key, session_id))
        problems = judge(outcome) + self._expectations(case, outcome)
        self._cleanup(case, outcome, own_session)
        return outcome, problems

    def minimise(self, finding: Finding) -> None:
        """Replace the finding's example by the smallest version of it that still shows the same finding."""

        def still_fails(case: Case) -> bool:
            return any(signature_of(case, p) == finding.signature for p in self.attempt(case)[1])

        finding.example = shrink(finding.example, still_fails, SHRINK_BUDGET)

    def _expectations(self, case: Case, outcome: Outcome) -> list[str]:
        """What the case's key and session imply on top of the general promise."""
        if case.key != "own" and outcome.code != "UNAUTHENTICATED":
            return [f"a call with {case.key} API key got {outcome.code}, not UNAUTHENTICATED"]
        if case.rpc in SESSION_RPCS and case.session != "own" and outcome.ok:
            return [f"a call on a {case.session} session id succeeded"]
        if outcome.code == "UNAVAILABLE" and not changes(self.actors, serve_actors()):
            return [f"UNAVAILABLE while every stage was up: {outcome.message!r}"]
        return []

    def _cleanup(self, case: Case, outcome: Outcome, own_session: str | None) -> None:
        created = outcome.reply.session_id if case.rpc == "CreateSession" and outcome.ok else None
        for sid in (own_session, created):
            if sid:
                try:
                    self.own.close_session(sid)
                except grpc.RpcError:
                    pass  # gone already (or the service is down: `_check_replicas` reports that)

    def _check_replicas(self, case: Case) -> None:
        """Record any replica that died or restarted during the case, then wait for the service to recover."""
        changed = changes(self.actors, serve_actors())
        if changed:
            self.report.restarts += [f"{c} (after {case!r})" for c in changed]
            self._wait_until_serving()
            self.actors = serve_actors()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if self.own.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)

    def check_victim(self) -> None:
        """The other key's session saw none of the cases: same token count, still idle."""
        now = self.other.get_session(self.victim.session_id)
        if now.token_count != self.victim.token_count or now.state != self.victim.state:
            self.report.victim_problems.append(
                f"victim session went from {self.victim.token_count} tokens / state {self.victim.state} "
                f"to {now.token_count} / {now.state}"
            )


def run_campaign(app: ServedApp, examples: int, seed: int | None = None) -> Report:
    """`examples` cases drawn by hypothesis (derandomized, or from `seed`), with innocent traffic alongside."""
    started, cpu = time.perf_counter(), time.process_time()
    fuzzer = Fuzzer(app)
    innocent = InnocentTraffic(app.target, app.keys[1])

    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=seed is None, phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck), print_blob=False,
    )  # fmt: skip
    @given(cases())
    def one(case: Case) -> None:
        number = fuzzer.report.examples + 1
        innocent.note = f"(seen while case {number} ran, {case!r}; an earlier case may be the cause)"
        fuzzer.run(case)

    try:
        with innocent.alongside():
            (fixed_seed(seed)(one) if seed is not None else one)()
            for finding in fuzzer.report.findings.values():
                fuzzer.minimise(finding)
        fuzzer.check_victim()
    finally:
        fuzzer.close()
        innocent.close()
    report = fuzzer.report
    report.cross_session_failures = innocent.failures
    report.innocent_answers = innocent.answers
    report.wall_s, report.cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return report
