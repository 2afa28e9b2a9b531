"""Tool calls streamed as they are written, one object per choice.

A parser's snapshot of the growing text (parsers/base.py, Snapshot) says what is certain so far:
a prefix of the content and, per call, its name and a prefix of its arguments. Each new snapshot
is compared with what was sent and the difference goes out: content, a new call (id and name
once the name is known), or more argument text for call k. When the choice finishes, the
finished text is read as the whole response reads it (ToolPlan.extract) and the rest is sent,
so for every text whose snapshots were prefixes of that reading the stream concatenates to the
whole response exactly. A snapshot that does not extend what was sent is not sent (it waits).

Only a text that breaks its format after a call was sent can disagree (prose after a llama3 call,
a call cut off by max_tokens): the calls sent stand, and the content the whole response has for
the text follows, so a client still receives every character the model wrote."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from orcinus.tools.parsers.base import Call, Snapshot, new_call_id
from orcinus.tools.parsers.partial_json import TooDeep


@dataclass
class CallDelta:
    index: int
    arguments: str  # the next fragment of the arguments string ('' with a new call's header)
    id: str | None = None  # with name, on the first delta of a call only
    name: str | None = None


@dataclass
class StreamDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


@dataclass
class _Sent:
    name: str
    arguments: str


class ToolCallStream:
    def __init__(self, snapshot: Callable[[str], Snapshot],
                 extract: Callable[[str], tuple[str | None, list[Call]]], max_calls: int | None = None) -> None:
        self.snapshot = snapshot
        self.extract = extract
        self.max_calls = max_calls
        self.content = ""
        self.calls: list[_Sent] = []

    @property
    def made_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str) -> StreamDelta:
        """The delta for the text so far (the whole text, not only what is new)."""
        try:
            snap = self.snapshot(text)
        except TooDeep:
            return StreamDelta()  # the finished text decides
        calls = snap.calls[:self.max_calls] if self.max_calls is not None else snap.calls
        if not snap.content.startswith(self.content) or len(calls) < len(self.calls) or any(
                name != s.name or not args.startswith(s.arguments) for (name, args), s in zip(calls, self.calls)):
            return StreamDelta()
        return self._send(snap.content, [Call(name, args, id="") for name, args in calls])

    def finish(self, text: str) -> StreamDelta:
        """The rest, from the finished text read as the whole response reads it. The snapshot of
        the whole text goes first: where that reading breaks with what was sent (a call cut by
        max_tokens), the stream still carries everything the snapshot was sure of."""
        head = self.feed(text)
        content, calls = self.extract(text)
        content = content or ""
        calls = calls[:self.max_calls] if self.max_calls is not None else calls
        if not content.startswith(self.content):
            content = self.content  # cannot happen for a snapshot that keeps to its parse
        return _merged(head, self._send(content, calls, finished=True))

    def _send(self, content: str, calls: list[Call], finished: bool = False) -> StreamDelta:
        delta = StreamDelta(content[len(self.content):])
        self.content = content
        for k, call in enumerate(calls):
            if k < len(self.calls):
                sent = self.calls[k]
                if call.name != sent.name or not call.arguments.startswith(sent.arguments):
                    continue  # a broken text read differently at the end: what was sent stands
                if len(call.arguments) > len(sent.arguments):
                    delta.calls.append(CallDelta(k, call.arguments[len(sent.arguments):]))
                    sent.arguments = call.arguments
            else:
                call_id = call.id if finished and call.id else new_call_id()
                delta.calls.append(CallDelta(k, call.arguments, call_id, call.name))
                self.calls.append(_Sent(call.name, call.arguments))
        return delta


def _merged(a: StreamDelta, b: StreamDelta) -> StreamDelta:
    """One delta for two in a row: one entry per call index (a header keeps its id and name)."""
    out = StreamDelta(a.content + b.content, [CallDelta(c.index, c.arguments, c.id, c.name) for c in a.calls])
    for c in b.calls:
        same = next((m for m in out.calls if m.index == c.index), None)
        if same is None:
            out.calls.append(c)
        else:
            same.arguments += c.arguments
    return out
