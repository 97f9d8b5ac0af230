"""Tooling around a node: the Python client and its CLIs, the local cluster, nginx, the bench.

Nothing under ``roomcast.tools`` is imported by a running node (tests/unit/test_layers.py).
"""
