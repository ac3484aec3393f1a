"""Backend dispatch: forced > environment > config > auto; unusable forced backends are clear errors."""

import pytest
import torch

from layers.ops import dispatch

OPS = {"naive": lambda x: "naive", "chunked": lambda x: "chunked"}


def test_auto_picks_chunked_on_cpu():
    assert dispatch.run("op", OPS, torch.zeros(1)) == "chunked"
    assert dispatch.run("op", {"naive": OPS["naive"]}, torch.zeros(1)) == "naive"


def test_precedence(monkeypatch):
    x = torch.zeros(1)
    assert dispatch.run("op", OPS, x, backend="naive") == "naive"
    monkeypatch.setenv(dispatch.ENV, "chunked")
    assert dispatch.run("op", OPS, x, backend="naive") == "chunked"
    with dispatch.force("naive"):
        assert dispatch.run("op", OPS, x) == "naive"
    assert dispatch.run("op", OPS, x) == "chunked"


def test_bad_requests_are_clear_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1)
    with pytest.raises(dispatch.BackendError, match="has no 'triton' backend"):
        with dispatch.force("triton"):
            dispatch.run("op", OPS, x)
    with pytest.raises(dispatch.BackendError, match="needs a CUDA device"):
        with dispatch.force("triton"):
            dispatch.run("op", {**OPS, "triton": lambda x: "t"}, x)
    monkeypatch.setenv(dispatch.ENV, "cuda-fast")
    with pytest.raises(dispatch.BackendError, match="not a backend"):
        dispatch.run("op", OPS, x)
    with pytest.raises(dispatch.BackendError, match="unknown backend"):
        with dispatch.force("fast"):
            pass
