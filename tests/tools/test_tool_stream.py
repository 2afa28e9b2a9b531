"""Tool calls streamed (tools/stream.py, the parsers' snapshots): recorded model texts fed char
by char and in random token-sized chunks; the deltas concatenate to what the whole response
says for the same text (content, names, arguments strings), calls start before the text ends,
and text that is not a call comes out as content."""
from __future__ import annotations

import random

import pytest

from orcinus.server.chat_tools import ToolPlan
from orcinus.tools import tool_choice as tc
from orcinus.tools.parsers import get_parser
from orcinus.tools.stream import ToolCallStream

FUNCTIONS = [tc.Function("get_weather", None, {}), tc.Function("get_time", None, {})]
TOOLS = [f.name for f in FUNCTIONS]

HERMES = [  # Qwen2.5-7B-Instruct style, recorded and varied
    'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "note": "雨 \\u2614 \\ud83d\\ude00", '
    '"days": [1, 2.50, -0, 1e3], "ok": true, "x": null}}\n</tool_call>',
    '<tool_call>{"arguments": {"tz": "UTC"}, "name": "get_time"}</tool_call>',  # arguments first
    '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"EST\\"}"}</tool_call>',  # arguments as text
    '<tool_call>{"name": "get_time", "parameters": {"tz": "UTC"}}',  # no closing tag
    "  Paris is sunny today; a < b and <tool is not a tag.\n",
    'Sure.<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # unknown function: content
    '<tool_call>{"name": </tool_call>',  # broken: content
    "<tool_call></tool_call> hmm",
]
LLAMA3 = [  # Llama-3.1-8B-Instruct style
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; {"name": "get_weather", "parameters": '
    '{"city": "São Paulo", "nested": {"a": [1, {"b": "\\"q\\""}]}}}',
    '\n{"name":"get_time","parameters":{"tz":"UTC"}}{"name":"get_time","parameters":{}}',
    "The weather is fine.",
    '<|python_tag|>print("hi")',
    '{"name": "other", "parameters": {}}',
]
GENERIC = [  # SmolLM2-135M-Instruct with the generic instructions
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '```json\n[{"name": "get_time", "arguments": {"tz": "UTC"}}, '
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]\n```',
    '{"tool_calls": [{"name": "get_time", "parameters": {"tz": "EST"}}, {"name": "get_weather", "arguments": '
    '{"city": "Kraków ❄", "unit": "celsius"}}]}',
    '[\n  {"name": "get_time", "arguments": {}},\n  {"name": "get_time", "arguments": {"tz": "J\\u00e9"}}\n]',
    "Sure! The weather in Paris is sunny.",
    '{"city": "Paris"}',
    '{"name": "other", "arguments": {}}',
    "```python\nprint(1)\n```",
    "[1, 2]",
    '{"name": ["get_time"], "arguments": {}}',
]


def _cuts(text: str, seed: int | None) -> list[int]:
    if seed is None:
        return list(range(1, len(text)))  # char by char
    rng = random.Random(seed)
    cuts, k = [], 0
    while True:
        k += rng.randint(1, 8)  # token-sized pieces
        if k >= len(text):
            return cuts
        cuts.append(k)


def _assemble(stream: ToolCallStream, text: str, seed: int | None):
    """(content, [(name, arguments)], how many deltas carried argument text before the end)."""
    content, calls, early = "", [], 0
    deltas = [stream.feed(text[:k]) for k in _cuts(text, seed)]
    early = sum(1 for d in deltas for c in d.calls if c.arguments)
    for d in deltas + [stream.finish(text)]:
        content += d.content
        for c in d.calls:
            if c.name is not None:  # a new call: its id and name come once, first
                assert c.index == len(calls) and c.id and c.id.startswith("call_")
                calls.append([c.name, c.arguments])
            else:
                assert c.id is None and c.index < len(calls)
                calls[c.index][1] += c.arguments
    return content, [tuple(c) for c in calls], early


def _parser_stream(name: str) -> ToolCallStream:
    parser = get_parser(name, TOOLS)
    return ToolCallStream(parser.snapshot, lambda t: (lambda p: (p.content, p.calls))(parser.parse(t)))


@pytest.mark.parametrize("parser, text", [("hermes", t) for t in HERMES] + [("llama3_json", t) for t in LLAMA3]
                         + [("json", t) for t in GENERIC])
@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_stream_concatenates_to_the_whole_parse(parser: str, text: str, seed: int | None) -> None:
    whole = get_parser(parser, TOOLS).parse(text)
    content, calls, early = _assemble(_parser_stream(parser), text, seed)
    assert content == (whole.content or "")
    assert calls == [(c.name, c.arguments) for c in whole.calls]


def test_calls_and_content_flow_before_the_end() -> None:
    text = HERMES[0]
    stream = _parser_stream("hermes")
    # the text before the tag is content as soon as it is written (trailing blanks wait)
    assert stream.feed("Let me check both.\n").content == "Let me check both."
    assert stream.feed("Let me check both.\n<tool_").content == ""  # may be a tag: held
    head = stream.feed(text[:text.index('"arguments"')])  # the name is known: the call starts
    assert [(c.index, c.name, c.arguments) for c in head.calls] == [(0, "get_weather", "")]
    assert stream.feed(text[:text.index("Paris") + 3]).calls[0].arguments == '{"city": "Par'
    for parser, text in [("hermes", HERMES[1]), ("llama3_json", LLAMA3[1]), ("json", GENERIC[2])]:
        _, calls, early = _assemble(_parser_stream(parser), text, None)
        assert early >= 10, (parser, early)  # argument text arrives piece by piece
    # prose is content from the first character for the JSON parsers
    assert _parser_stream("json").feed("Sure").content == "Sure"
    assert _parser_stream("llama3_json").feed("The").content == "The"


def test_parallel_tool_calls_false_streams_one_call() -> None:
    plan = ToolPlan("auto", FUNCTIONS, None, "hermes", parallel=False)
    content, calls, _ = _assemble(plan.stream(), HERMES[0], 0)
    assert content == "Let me check both." and [n for n, _ in calls] == ["get_weather"]
    assert (content, calls) == (plan.extract(HERMES[0])[0], [(c.name, c.arguments) for c in plan.extract(HERMES[0])[1]])


@pytest.mark.parametrize("mode, text", [
    ("named", '{"city": "Paris", "unit": "celsius"}'),
    ("named", '{ "city" :"Zürich \\u00e9",\n  "unit":"fahrenheit" }'),
    ("required", '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}, '
                 '{"name": "get_time", "arguments": {"tz": "CET"}}]'),
    ("required", '[ {"name":"get_time","arguments":{"tz":"UTC"}} ]'),
])
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_named_and_required_stream_from_the_start(mode: str, text: str, seed: int | None) -> None:
    plan = ToolPlan(mode, FUNCTIONS, FUNCTIONS[0] if mode == "named" else None, "json", parallel=True)
    content, calls, early = _assemble(plan.stream(), text, seed)
    whole_content, whole_calls = plan.extract(text)
    assert content == (whole_content or "") and calls == [(c.name, c.arguments) for c in whole_calls]
    assert early >= 2  # more than one chunk carries argument text
    if mode == "named":  # the header goes out with the first token, before any argument text
        first = plan.stream().feed(text[:1])
        assert first.calls[0].name == "get_weather"


def test_a_text_broken_after_a_call_keeps_the_call_and_sends_the_text() -> None:
    # The whole response reads prose after a llama3 call as "not a call"; a stream has sent the
    # call already, so it keeps it and sends the text as content too: nothing is lost.
    text = '{"name": "get_time", "parameters": {"tz": "UTC"}} and then some prose'
    stream = _parser_stream("llama3_json")
    content, calls, _ = _assemble(stream, text, None)
    assert get_parser("llama3_json", TOOLS).parse(text).calls == []
    assert calls == [("get_time", '{"tz": "UTC"}')] and content == text and stream.made_calls


@pytest.mark.parametrize("depth", [300, 5000])
@pytest.mark.parametrize("parser", ["json", "hermes", "llama3_json"])
def test_deep_nesting_waits_for_the_finished_text(parser: str, depth: int) -> None:
    # 300 levels: a call whose arguments are too deep to follow while written; they come at
    # the end. 5000: json.loads gives up (RecursionError), so the whole response has no call,
    # but the stream had sent the call's start: a format broken after a call went out, whose
    # text then comes as content too. Neither crashes.
    key = "parameters" if parser == "llama3_json" else "arguments"
    text = f'{{"name": "get_time", "{key}": {{"a": ' + "[" * depth + "]" * depth + "}}"
    if parser == "hermes":
        text = f"<tool_call>{text}</tool_call>"
    whole = get_parser(parser, TOOLS).parse(text)
    assert len(whole.calls) == (1 if depth == 300 else 0)
    content, calls, _ = _assemble(_parser_stream(parser), text, 0)
    assert content == (whole.content or "")
    if depth == 300:
        assert calls == [(c.name, c.arguments) for c in whole.calls]
    else:
        assert content == text and [name for name, _ in calls] == ["get_time"]


@pytest.mark.parametrize("seed", range(60))
def test_random_calls_in_every_format(seed: int) -> None:
    # calls with random arguments (unicode, escapes, numbers spelled many ways), written the way
    # each format allows (blanks, key order, tags, fences, separators), in random chunks
    from test_partial_json import _text, _value

    rng = random.Random(seed)
    parser = ["hermes", "llama3_json", "json"][seed % 3]
    key = "parameters" if parser == "llama3_json" else "arguments"
    calls = [(rng.choice(TOOLS), {f"a{i}": _value(rng) for i in range(rng.randint(0, 3))})
             for _ in range(rng.randint(1, 3))]
    written = [_text(rng, {"name": n, key: a} if rng.random() < 0.8 else {key: a, "name": n}) for n, a in calls]
    if parser == "hermes":
        text = rng.choice(["", "Let me look.\n", "  ok ", "a < b "]) + "".join(
            f"<tool_call>{rng.choice(['', chr(10)])}{w}{rng.choice(['', chr(10)])}</tool_call>{rng.choice(['', chr(10)])}"
            for w in written)
    elif parser == "llama3_json":
        text = rng.choice(["", "<|python_tag|>"]) + rng.choice(["; ", ";", "\n"]).join(written)
    else:
        body = f"[{', '.join(written)}]" if len(written) > 1 or rng.random() < 0.3 else written[0]
        if rng.random() < 0.3:
            body = f'{{"tool_calls": [{", ".join(written)}]}}'
        text = rng.choice(["%s", "```json\n%s\n```", "```\n%s```", " %s\n"]).replace("%s", body)
    whole = get_parser(parser, TOOLS).parse(text)
    assert len(whole.calls) == len(calls)
    content, got, _ = _assemble(_parser_stream(parser), text, seed)
    assert content == (whole.content or "") and got == [(c.name, c.arguments) for c in whole.calls]


def test_cut_by_max_tokens() -> None:
    # named: the stream has the normalised arguments so far, the whole response the raw text
    plan = ToolPlan("named", FUNCTIONS, FUNCTIONS[0], "json", parallel=True)
    content, calls, _ = _assemble(plan.stream(), '{ "city" :"Par', None)
    assert (content, calls) == ("", [("get_weather", '{"city": "Par')])
    assert plan.extract('{ "city" :"Par')[1][0].arguments == '{ "city" :"Par'
    # required: the whole response has no complete call and returns the text; the stream keeps
    # the call it began and sends the text too
    plan = ToolPlan("required", FUNCTIONS, None, "json", parallel=True)
    text = '[{"name": "get_time", "arguments": {"tz": "C'
    content, calls, _ = _assemble(plan.stream(), text, None)
    assert plan.extract(text) == (text, [])
    assert content == text and calls == [("get_time", '{"tz": "C')]
