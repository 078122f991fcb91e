"""The enserve inference daemon: orchestrator, workers, shared memory, KServe v2 frontends."""
