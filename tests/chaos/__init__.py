"""Chaos suite: real redis-server and node processes, faults injected while a canary runs.

canary.py publishes and subscribes and accounts for every acknowledged message; attackers.py
holds the hostile clients (floods, non-readers, bursts); test_chaos.py is one test per fault.
"""
