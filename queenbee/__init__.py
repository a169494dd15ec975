"""queenbee: an OpenAI-compatible router that forwards requests to workerbee workers."""

__version__ = "0.1.0"
