"""The sans-I/O protocol layer: bytes and values in, bytes and values out; no asyncio, no I/O."""
