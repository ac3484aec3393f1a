"""Registered layers. Importing this package registers the built-in symbols with ``hybridnas.registry``."""

from layers import attention, ffn, hyena, mamba, moe, norm, rwkv  # noqa: F401  (registration side effects)
