"""csra: Customer Support Response Assistant (shared settings, job specs and CLI)."""

__version__ = "0.1.0"
