"""The enserve inference daemon: orchestrator, workers, shared memory, KServe v2 frontends."""

__version__ = "0.1.0"
