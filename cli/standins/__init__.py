"""Local stand-ins for the platforms (send APIs, Discord gateway), for the demo, tests and load runs."""
