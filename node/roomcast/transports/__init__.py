"""Transports: adapt a client connection (WebSocket, HTTP) to the service layer."""
