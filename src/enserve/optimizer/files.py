"""Files that several processes or machines share (plans, a build library): each is replaced
whole, through a temporary file of the writer's own."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or its old content, never a part; the temporary file is named by host
    and process, so writers on other machines or in other processes never take each other's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
