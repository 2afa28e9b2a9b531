"""A generation body is judged from its bytes before it is parsed (issue 19, finding 1): the
lone-surrogate check is exact, and a body with more items than its prompts could hold is refused
without parsing it, in C-speed passes rather than a Python walk over every element."""
from __future__ import annotations

import json

import pytest

from orcinus.server.body_precheck import lone_surrogate_at, too_many_items


@pytest.mark.parametrize("text, lone", [
    ("plain", False), ("\udc80x", True), ("x\ud800", True), ("\ud83d\ude00 emoji", False),
    ("\ud83d\ud83d\ude00", True), ("\ude00\ud83d", True), ("😀 raw", False),
])
def test_lone_surrogates_are_found_exactly(text: str, lone: bool) -> None:
    body = json.dumps({"prompt": text, "stop": ["a"]}).encode()  # json.dumps escapes them as \\udXXX
    assert (lone_surrogate_at(body) is not None) == lone
    raw = json.dumps({"prompt": text}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if not lone:
        assert lone_surrogate_at(raw) is None


def test_an_escaped_backslash_is_not_an_escape() -> None:
    body = json.dumps({"prompt": "\\udc80 is how JSON spells it"}).encode()  # the text, not the character
    assert b"\\\\udc80" in body
    assert lone_surrogate_at(body) is None
    assert lone_surrogate_at(json.dumps({"prompt": "\\\udc80"}).encode()) is not None


def test_the_issue_body_of_millions_of_ids_is_refused_from_its_size() -> None:
    body = json.dumps({"prompt": [1] * 4_000_000}).encode()
    assert too_many_items(body, max_model_len=8192, max_prompt_chars=8192 * 64) == 4_000_000 - 1


@pytest.mark.parametrize("body", [
    {"prompt": [[7] * 8000] * 40},  # many prompts, each just fitting
    {"prompt": ["a, b, c, " * 20000] * 3},  # text full of commas, each prompt within the character bound
    {"messages": [{"role": "user", "content": ",,,," * 30000}]},
    {"prompt": "x" * 500_000},
])
def test_requests_that_could_fit_are_left_to_the_exact_checks(body: dict) -> None:
    assert too_many_items(json.dumps(body).encode(), max_model_len=8192, max_prompt_chars=8192 * 20) is None
