"""The attention micro-benchmark's batches (bench/attention_micro.py): the decode-heavy batch and
`--prompts`, and a run that prints one line per backend."""
from __future__ import annotations

import re

from orcinus.bench.attention_micro import main, make_batch


def test_prompt_batches_are_whole_prompts_and_the_default_mostly_decodes():
    layout, _ = make_batch(8, 9, 3, 64, 16, prompts=True)
    assert (layout.query_lens == layout.seq_lens).all() and layout.query_lens.min() >= 32
    layout, _ = make_batch(8, 9, 3, 64, 16)
    assert (layout.query_lens[2:] == 1).all() and (layout.query_lens[:2] > 1).all()


def test_a_run_reports_every_backend(capsys):
    main(["--requests", "3", "--backends", "paged,paged-torch,reference", "--repeats", "1", "--prompts"])
    out = capsys.readouterr().out
    assert re.search(r"3 requests \(whole prompts, \d+ query tokens\)", out)
    for name in ("paged", "paged-torch", "reference"):
        assert re.search(rf"^{name}: \d+\.\d+ ms CPU per layer$", out, re.M), out
