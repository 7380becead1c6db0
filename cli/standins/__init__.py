"""Local stand-ins for the platforms (Discord gateway, ...) used by tests and the demo."""
