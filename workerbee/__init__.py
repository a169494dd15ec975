"""workerbee: serve GGUF models to a queenbee over a websocket."""

import os

# huggingface_hub otherwise fetches an agent registry from the hub on first use, even when only a local
# file is served; a worker reaches the hub only to download models. Users may still opt back in.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
