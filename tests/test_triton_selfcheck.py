"""Triton that checks itself: a kernel that raises or returns wrong values on its first use is caught by the
dispatch's self-check, warned about once, replaced by the chunked path, and recorded on a search's trials.

The kernels are monkeypatched (no Triton needed); ``triton_usable`` is patched to say yes so the CPU takes the
Triton path as a CUDA machine would.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hybridnas import search
from hybridnas.config import load_space
from layers.ops import dispatch
from layers.ops import mamba2 as mamba2_op
from layers.ops import rwkv7 as rwkv7_op


@pytest.fixture
def fake_triton(monkeypatch):
    """mamba2's kernel raises (a compile error), rwkv7's returns the chunked output scaled (a wrong kernel)."""
    calls = {"mamba2": 0, "rwkv7": 0}

    def broken(*args, **kwargs):
        calls["mamba2"] += 1
        raise RuntimeError("PTX compile failed (simulated)")

    def wrong(*args, **kwargs):
        calls["rwkv7"] += 1
        o, state = rwkv7_op.rwkv7_chunked(*args, **kwargs)
        return o * 1.5, state

    monkeypatch.setitem(mamba2_op.BACKENDS, "triton", broken)
    monkeypatch.setitem(rwkv7_op.BACKENDS, "triton", wrong)
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    dispatch.reset_checks()
    yield calls
    dispatch.reset_checks()


def test_self_check_catches_raise_and_mismatch(fake_triton):
    g = torch.Generator().manual_seed(1)
    m_args, m_kw = mamba2_op.probe(torch.device("cpu"), torch.float32)
    r_args = [torch.randn(1, 7, 2, 8, generator=g) for _ in range(6)]
    r_args[1] = -torch.rand(1, 7, 2, 8, generator=g)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with dispatch.force("triton"):
            for _ in range(3):
                y, _ = mamba2_op.ssd(*m_args, **m_kw)
                o, _ = rwkv7_op.rwkv7(*r_args)
    ref_y, _ = mamba2_op.ssd_chunked(*m_args, **m_kw)
    ref_o, _ = rwkv7_op.rwkv7_chunked(*r_args)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(o, ref_o)  # the wrong kernel's output never reaches the caller
    assert fake_triton == {"mamba2": 1, "rwkv7": 1}  # each kernel tried once (its check), never again
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 2, msgs  # one warning per (op, device, dtype), not per call
    fb = dispatch.fallbacks()
    assert set(fb) == {"mamba2/cpu/float32", "rwkv7/cpu/float32"}
    assert "RuntimeError" in fb["mamba2/cpu/float32"] and "PTX" in fb["mamba2/cpu/float32"]
    assert "relative error" in fb["rwkv7/cpu/float32"]
    # another dtype is another check
    with dispatch.force("triton"), pytest.warns(RuntimeWarning, match="float64"):
        rwkv7_op.rwkv7(*(a.double() for a in r_args))
    assert "rwkv7/cpu/float64" in dispatch.fallbacks()


def test_good_kernel_passes_and_runs(monkeypatch):
    """A correct kernel passes its check and is the one that runs; a later launch error falls back."""
    calls = []

    def good(*args, **kwargs):
        calls.append(args[0].shape)
        if args[0].shape[1] == 9:
            raise RuntimeError("out of resources (simulated)")
        return mamba2_op.ssd_chunked(*args, **kwargs)

    monkeypatch.setitem(mamba2_op.BACKENDS, "triton", good)
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    dispatch.reset_checks()
    try:
        args, kw = mamba2_op.probe(torch.device("cpu"), torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with dispatch.force("triton"):
                mamba2_op.ssd(*(a[:, :5] if a.dim() > 1 and a.shape[1] == 20 else a for a in args), **kw)
        assert len(calls) == 2 and dispatch.fallbacks() == {}  # the check, then the real call
        with dispatch.force("triton"), pytest.warns(RuntimeWarning, match="out of resources"):
            mamba2_op.ssd(*(a[:, :9] if a.dim() > 1 and a.shape[1] == 20 else a for a in args), **kw)
        assert "mamba2/cpu/float32" in dispatch.fallbacks()
    finally:
        dispatch.reset_checks()


SPACE = """\
name: selfcheck
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model:
  d_model: 32
  pattern: ["MR", "RM"]
  layers:
    M: {variant: mamba2, d_state: 8, headdim: 16, chunk_size: 8}
    R: {head_size: 16, decay_rank: 4, a_rank: 4, v_rank: 4, gate_rank: 4, chunk_size: 8}
train: {steps: 3, batch_size: 8, eval_every: 3, warmup_steps: 1, lr: 3.0e-3}
search: {n_trials: 2, seed: 0, lr_mode: sample, pruner: none, save_weights: false}
"""


def test_search_with_forced_triton_records_fallbacks(fake_triton, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(dispatch.ENV, "triton")
    (tmp_path / "s.yaml").write_text(SPACE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        study = search.run_search(load_space(str(tmp_path / "s.yaml")), quiet=True)
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.state.name == "COMPLETE", (t.state, t.user_attrs.get("error"))
        fb = t.user_attrs["backend_fallbacks"]
        assert set(fb) == {"mamba2/cpu/float32", "rwkv7/cpu/float32"}, fb


@pytest.mark.parametrize("kernel", ["broken", "good"])
def test_self_check_under_torch_compile(monkeypatch, kernel):
    """The check runs eagerly inside a compiled layer (torch.compiler.disable); the compiled layer then runs the
    chunked path (kernel raising) or the kernel (kernel passing), and matches eager."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if kernel == "broken":
            raise RuntimeError("launch failed (simulated)")
        return mamba2_op.ssd_chunked(*args, **kwargs)

    monkeypatch.setitem(mamba2_op.BACKENDS, "triton", fake)
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    dispatch.reset_checks()
    torch._dynamo.reset()
    try:
        from hybridnas import registry

        torch.manual_seed(0)
        layer = registry.get("M").build(32, {"variant": "mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8})
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
        ref = layer(x, {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with dispatch.force("triton"):
                compiled = torch.compile(layer, backend="eager")
                got = [compiled(x, {}) for _ in range(2)]
        for y in got:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
        if kernel == "broken":
            assert len(calls) == 1 and "mamba2/cpu/float32" in dispatch.fallbacks()
        else:
            assert len(calls) >= 3 and dispatch.fallbacks() == {}  # the check, then the kernel in each call
    finally:
        dispatch.reset_checks()
        torch._dynamo.reset()


def test_importing_the_ops_imports_no_triton():
    """The self-check's dynamo wrapper is made on first use: importing dispatch and the ops imports neither
    torch._dynamo nor triton (the Triton interpreter needs TRITON_INTERPRET set before triton's first import)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from layers.ops import dispatch; dispatch.import_ops(); import hybridnas.doctor; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
