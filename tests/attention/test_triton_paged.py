"""The Triton backend against the reference backend: under Triton's interpreter on CPU (in CI, in
a subprocess, because TRITON_INTERPRET must be set before triton compiles the kernel), and
compiled on a GPU when one is present."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is in the `test` extra; install it to run this test")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_interpreter_matches_reference_on_mixed_batches():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from attention_cases import CASES
    assert proc.stdout.split() == [c.name for c in CASES]  # every case ran and matched


INTERPRETED = """
import torch
from attention_cases import CASES, assert_matches_reference
from orcinus.attention.triton_paged import TritonPagedAttention
torch.set_num_threads(1)
for case in CASES:
    assert_matches_reference(TritonPagedAttention(), case)
    print(case.name)
"""


def test_interpreter_matches_float32_reference_at_real_shapes():
    """head_dim 64/128, blocks of 16/32, GQA 1/4/8, bfloat16/float16/float32, long contexts, windows
    (tests/attention/real_shape_cases.py): the tl.dot path the GPU runs."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED_REAL], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from real_shape_cases import REAL_SHAPE_CASES
    assert proc.stdout.split() == [c.name for c, _ in REAL_SHAPE_CASES]


INTERPRETED_REAL = """
import torch
from real_shape_cases import REAL_SHAPE_CASES, assert_matches_float32_reference
from orcinus.attention.triton_paged import TritonPagedAttention
torch.set_num_threads(1)
for case, dtype in REAL_SHAPE_CASES:
    assert_matches_float32_reference(TritonPagedAttention(), case, dtype)
    print(case.name)
"""


@pytest.mark.gpu
def test_compiled_kernel_matches_float32_reference_at_real_shapes_on_gpu():
    import torch
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU")
    from real_shape_cases import REAL_SHAPE_CASES, TOLERANCE, make_inputs
    from orcinus.attention.reference import ReferenceAttention
    from orcinus.attention.triton_paged import TritonPagedAttention

    for case, dtype in REAL_SHAPE_CASES:
        layout, *tensors = make_inputs(case)
        rounded = [t.to(dtype) for t in tensors]
        outs = []
        for backend, dev, ts in ((ReferenceAttention(), "cpu", [t.float() for t in rounded]),
                                 (TritonPagedAttention(), "cuda", rounded)):
            meta = backend.build(layout, lambda a, d=dev: torch.from_numpy(a.copy()).to(d))
            t = [x.clone().to(dev) for x in ts]
            outs.append(backend.forward(*t, meta, case.head_dim ** -0.5, case.sliding_window).float().cpu())
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol, msg=lambda m: f"{case.name}: {m}")


@pytest.mark.gpu
def test_compiled_kernel_matches_reference_on_gpu():
    import torch
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU")
    from attention_cases import CASES, make_inputs
    from orcinus.attention.reference import ReferenceAttention
    from orcinus.attention.triton_paged import TritonPagedAttention

    for case in CASES:
        layout, q, k, v, kc, vc = make_inputs(case)
        outs = []
        for backend, dev in ((ReferenceAttention(), "cpu"), (TritonPagedAttention(), "cuda")):
            meta = backend.build(layout, lambda a, d=dev: torch.from_numpy(a.copy()).to(d))
            t = [x.clone().to(dev) for x in (q, k, v, kc, vc)]
            outs.append(backend.forward(*t, meta, case.head_dim ** -0.5, case.sliding_window).cpu())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-3)
