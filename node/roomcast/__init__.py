"""roomcast: a horizontally scaled WebSocket broadcast cluster.

The package is layered; each layer imports only the ones below it (tests/unit/test_layers.py
checks this):

* ``roomcast.protocol``   sans-I/O: envelopes, dialect codecs, close codes. No asyncio.
* ``roomcast.backends``   broker, history and presence seams, memory and Redis side by side.
* ``roomcast.service``    the use cases (join, leave, publish, typing, presence, history, kick)
                          on an ``Identity``; knows nothing of sockets.
* ``roomcast.transports`` adapters from a connection to the service: the WebSocket endpoint
                          (three dialects over one loop), HTTP on the client port, the drain.
* ``roomcast.app``        the ``Node``: builds the layers from one ``Config``, owns the lifecycle.
* ``roomcast.tools``      the Python client and its CLIs, the local cluster, nginx, the bench
                          command. The node never imports them.
"""

__version__ = "0.1.0"
