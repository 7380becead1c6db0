"""Workers: consume partition queues and run each session's turns in order."""
