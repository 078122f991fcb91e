"""From a validated request to its answer: the orchestrator, dispatch to worker processes, shared
memory rings and slots, the in-flight requests, completions, recovery, the workers themselves."""
