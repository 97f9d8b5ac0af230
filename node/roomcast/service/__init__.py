"""The service layer: every use case, written once, for every transport (no sockets here)."""
