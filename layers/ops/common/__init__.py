"""Pieces shared by several ops: the chunked scalar-decay scan of Mamba-2 and Mamba-3 (``scalar_decay_chunked``)
and its Triton kernel (``scalar_decay_triton``, imported only on first use: it needs triton)."""
