"""Whether new work is taken: the one "shutting down" state. The server has one, which a signal
drains (the fronts and the service read it); each loaded unit (an orchestrator, its supervisor)
has its own under the server's, drained when the unit closes (an unload, or the server's stop)."""

from __future__ import annotations

from enserve.server.errors import Unavailable


class Lifecycle:
    def __init__(self, parent: Lifecycle | None = None) -> None:
        self.parent = parent
        self.draining = False  # this one stopped taking work (its own state, not its parent's)

    @property
    def accepting(self) -> bool:
        """New work is taken: neither this one nor anything above it is draining."""
        return not self.draining and (self.parent is None or self.parent.accepting)

    def drain(self) -> None:
        self.draining = True

    def check_accepting(self, what: str = "the server") -> None:
        """UNAVAILABLE unless new work is taken; ``what`` names this level (a unit: its model)."""
        if self.parent is not None and not self.parent.accepting:
            self.parent.check_accepting()
        if self.draining:
            raise Unavailable(f"{what} is shutting down and accepts no new requests")
