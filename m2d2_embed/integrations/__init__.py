"""Integrations with other engines. Each submodule imports its engine lazily, so ``import m2d2_embed`` never does.

- :mod:`m2d2_embed.integrations.ray`: bulk extraction on Ray Data (``pip install 'm2d2-embed[ray]'``).
"""
