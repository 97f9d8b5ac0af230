"""roomcast: a horizontally scaled WebSocket broadcast cluster."""

__version__ = "0.1.0"
