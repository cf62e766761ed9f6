"""The job statuses that PyBit knows, and which of them end a job."""

from .errors import UnknownStatus

WAITING = "Waiting"
BLOCKED = "Blocked"
CANCELLED = "Cancelled"
BUILDING = "Building"
FAILED = "Failed"
UPLOADED = "Uploaded"
DONE = "Done"

#: Exactly the statuses in PyBit's database: any other name makes its insert fail.
ALL = (WAITING, BLOCKED, CANCELLED, BUILDING, FAILED, UPLOADED, DONE)

#: Statuses after which the worker reports nothing more for the job.
FINAL = frozenset({DONE, FAILED, BLOCKED, CANCELLED})


def check(status: str) -> str:
    """Return *status* if PyBit knows it; raise :class:`UnknownStatus` naming the allowed ones."""
    if status not in ALL:
        raise UnknownStatus(
            f"unknown status {status!r}: PyBit knows only {', '.join(ALL)}"
        )
    return status
