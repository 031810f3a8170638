"""kolite: a lightweight, fast, Korean-first GPT-2 text-generation and chat server."""

__version__ = "0.1.0"
