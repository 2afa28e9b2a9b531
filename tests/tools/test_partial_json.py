"""Partial JSON: for every prefix of a JSON text, what dumps_prefix says is a prefix of
json.dumps(ensure_ascii=False) of the finished value, and the finished text gives it whole;
broken texts are told apart from unfinished ones."""
from __future__ import annotations

import json
import random

import pytest

from orcinus.tools.parsers.partial_json import Invalid, dumps_prefix, parse

WORDS = ["Paris", "Zürich", "雨 ☔", "a\"b", "back\\slash", "tab\there", "new\nline", "😀", "", "\u2028", "x\u0001y"]


def _value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["str", "int", "float", "bool", "null", "obj", "arr"] if depth < 3 else ["str", "int", "float"])
    if kind == "str":
        return rng.choice(WORDS)
    if kind == "int":
        return rng.choice([0, -7, 12345678901234567890, 42])
    if kind == "float":
        return rng.choice([1.5, -0.25, 1e21, 3.0e-7, 100.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "obj":
        return {f"k{i}{rng.choice(WORDS)}": _value(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def _text(rng: random.Random, value) -> str:
    # the many ways a model may write the same value: blanks, \u escapes, number spellings
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 0, 2]),
                      separators=rng.choice([(",", ":"), (", ", ": "), (" ,", " : ")]))
    return text.replace("1e+21", "1E21").replace("100.0", "1.00e2")


@pytest.mark.parametrize("seed", range(40))
def test_every_prefix_says_a_prefix_of_the_final_dumps(seed: int) -> None:
    rng = random.Random(seed)
    value = {"root": _value(rng)}
    text = _text(rng, value)
    final = json.dumps(json.loads(text), ensure_ascii=False)
    previous = ""
    for k in range(len(text) + 1):
        said = dumps_prefix(parse(text[:k], 0))
        assert final.startswith(said), (text[:k], said)
        assert said.startswith(previous)  # never takes anything back
        previous = said
    node = parse(text, 0)
    assert node.complete and dumps_prefix(node) == final


def test_held_back_pieces() -> None:
    # a number may go on; an escape or a surrogate pair may be cut; a key's ': ' is certain
    assert dumps_prefix(parse('{"a": 12', 0)) == '{"a": '
    assert dumps_prefix(parse('{"a": 12,', 0)) == '{"a": 12, '
    assert dumps_prefix(parse('{"a": 1.', 0)) == '{"a": '
    assert dumps_prefix(parse('{"a": "x\\', 0)) == '{"a": "x'
    assert dumps_prefix(parse('{"a": "x\\u00f', 0)) == '{"a": "x'
    assert dumps_prefix(parse('{"a": "x\\u00fc', 0)) == '{"a": "xü'
    assert dumps_prefix(parse('{"a": "\\ud83d', 0)) == '{"a": "'
    assert dumps_prefix(parse('{"a": "\\ud83d\\ude00', 0)) == '{"a": "😀'
    assert dumps_prefix(parse('{"a"', 0)) == '{"a": '
    assert dumps_prefix(parse('{"a": tr', 0)) == '{"a": '
    assert dumps_prefix(parse('{"ab', 0)) == '{"ab'
    assert parse("  ", 0) is None


@pytest.mark.parametrize("text", ['{"a": x', '{"a" 1', '{"a": 1 "b"', '["a" "b"', '{"a": "x\ny"', '{1', "hello",
                                  '{"a": "b"}}', '[1, 2.x'])
def test_broken_texts_are_invalid(text: str) -> None:
    with pytest.raises(Invalid):
        node = parse(text, 0)
        if node is not None and node.complete and node.end < len(text):
            raise Invalid("text after the value")  # what a caller checks
