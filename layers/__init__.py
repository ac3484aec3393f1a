"""Registered layers. Importing this package registers the built-in symbols with ``hybridnas.registry``."""

from layers import attention, ffn, moe, norm  # noqa: F401  (registration side effects)
