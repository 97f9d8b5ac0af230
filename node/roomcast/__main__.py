"""``python -m roomcast``: the ``roomcast`` command (``python -m roomcast node`` runs a node)."""

from roomcast.cli import main

main()
