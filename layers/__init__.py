"""The mixers and FFNs of hybridnas, importable with torch alone (nothing of ``hybridnas``).

Importing this package imports no layer: :mod:`layers.registry` declares the built-in symbols as import paths
and loads each on first use, so ``import layers.ops.mamba3`` stays light.
"""
