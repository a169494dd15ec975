"""workerbee: serve GGUF models to a queenbee over a websocket."""

__version__ = "0.1.0"
