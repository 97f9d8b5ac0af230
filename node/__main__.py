"""``python -m node`` runs a node: the same as ``roomcast node``."""

import sys

from node.cli import main

main(["node", *sys.argv[1:]])
