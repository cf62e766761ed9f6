"""What a runner is handed: the message as received, and its request decoded safely."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    """One build request taken off a queue.

    ``body`` is the text exactly as received; ``request`` is the same request
    decoded by :mod:`rbit.pybit` (a BuildRequest with PyBit's accessors).
    """

    body: str
    request: object
    queue: str
    redelivered: bool = False
    headers: dict = field(default_factory=dict)
    #: The worker that left this job unfinished, when it was put back for another run.
    recovered_from: str | None = None

    @property
    def job_id(self) -> int:
        """The PyBit job id."""
        return self.request.get_job_id()
