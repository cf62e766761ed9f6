"""Messages as the broker hands them out (:class:`Delivery`) and takes them in (:class:`Outgoing`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: persistent, with its body, headers and other properties."""

    body: bytes | str
    headers: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)


@dataclass
class Delivery:
    """A message taken off a queue; :meth:`ack` or :meth:`requeue` settles it once."""

    body: bytes | str
    headers: dict
    properties: dict
    redelivered: bool = False
    _settle: Callable[[bool], None] | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The body as text (bodies rbit handles are UTF-8 JSON; a bad byte shows as U+FFFD)."""
        return self.body if isinstance(self.body, str) else self.body.decode("utf-8", "replace")

    def ack(self) -> None:
        self._settled(True)

    def requeue(self) -> None:
        self._settled(False)

    def _settled(self, ack):
        settle, self._settle = self._settle, None
        if settle is not None:
            settle(ack)

    def copy(self, extra_headers: dict | None = None, drop=()) -> Outgoing:
        """This message's body and properties, plus *extra_headers*, less the headers in *drop*."""
        headers = {**self.headers, **(extra_headers or {})}
        for name in drop:
            headers.pop(name, None)
        return Outgoing(self.body, headers, dict(self.properties))
