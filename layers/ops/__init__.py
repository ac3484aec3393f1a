"""Sequence ops with three paths each (``naive`` oracle, ``chunked`` PyTorch, ``triton``); see ``dispatch``."""
