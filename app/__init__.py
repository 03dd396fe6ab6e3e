"""clawbot: an OpenAI-compatible gateway for local models."""

__version__ = "0.1.0"
