"""The `chatsessions` command: starts the processes and gives operators their tools."""
