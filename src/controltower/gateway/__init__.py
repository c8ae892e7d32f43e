"""The governed tool gateway: every tool call by every agent passes one pipeline."""
