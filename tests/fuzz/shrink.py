"""Smaller versions of a failing request, field by field, so a finding is reported with a minimal example.

Hypothesis shrinks only failures it raises; the campaign records its findings instead (so one run lists them
all), then shrinks each here: clear one set field, drop half or one element of a repeated field, or do the same
inside a sub-message, and keep the change while the same finding still shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from google.protobuf.message import Message

from tests.fuzz.strategies import Case


def simpler(msg: Message) -> Iterator[Message]:
    """Copies of `msg` with one thing taken away, biggest cuts first."""
    for fd, value in msg.ListFields():
        yield _without(msg, fd.name)
        if fd.is_repeated:
            n = len(value)
            halves = [range(n // 2), range(n // 2, n)] if n > 1 else []
            for kept in [*halves, *([j for j in range(n) if j != i] for i in range(n))]:
                yield _keeping(msg, fd.name, kept)
            if fd.message_type is not None:
                for i in range(n):
                    for sub in simpler(value[i]):
                        yield _replacing(msg, fd.name, sub, i)
        elif fd.message_type is not None:
            for sub in simpler(value):
                yield _replacing(msg, fd.name, sub)


def _copy(msg: Message) -> Message:
    clone = type(msg)()
    clone.CopyFrom(msg)
    return clone


def _without(msg: Message, name: str) -> Message:
    clone = _copy(msg)
    clone.ClearField(name)
    return clone


def _keeping(msg: Message, name: str, indices: Sequence[int]) -> Message:
    """`msg` with only the elements at `indices` of its repeated field `name`."""
    clone = _copy(msg)
    field = getattr(clone, name)
    kept = [_copy(field[i]) if isinstance(field[i], Message) else field[i] for i in indices]
    del field[:]
    field.extend(kept)
    return clone


def _replacing(msg: Message, name: str, sub: Message, index: int | None = None) -> Message:
    """`msg` with its sub-message `name` (element `index` of it, when repeated) replaced by `sub`."""
    clone = _copy(msg)
    target = getattr(clone, name) if index is None else getattr(clone, name)[index]
    target.CopyFrom(sub)
    return clone


def shrink(case: Case, still_fails: Callable[[Case], bool], budget: int = 60) -> Case:
    """The smallest case reached by taking things away while `still_fails` holds (at most `budget` tries)."""
    improved = True
    while improved and budget > 0:
        improved = False
        for request in simpler(case.request):
            budget -= 1
            candidate = replace(case, request=request)
            if still_fails(candidate):
                case, improved = candidate, True
                break
            if budget <= 0:
                break
    return case
