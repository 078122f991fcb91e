"""How enserve starts Python processes of its own (workers, the profiler, trial workers, the daemon
from the bench and the tests): the same interpreter, the module by name, and ``-P``, so that the
current directory is never put on ``sys.path``: a folder called ``enserve`` where the user happens
to be (a checkout, a project of theirs) can never stand in for the installed package."""

from __future__ import annotations

import sys


def python_module(module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args`` as enserve's children run."""
    return [sys.executable, "-P", "-m", module, *args]
