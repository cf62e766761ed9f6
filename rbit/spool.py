"""The status spool: statuses waiting for PyBit, kept in a file so that they survive a restart."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from . import statuses
from .errors import UnknownStatus

log = logging.getLogger(__name__)

#: Log templates (lazy ``%`` arguments).
SPOOL_ERROR_LOG = "status spool %s: %s"
SPOOL_LINE_LOG = "status spool %s line %d skipped: %s"
SPOOL_FOUND_LOG = "status spool %s: %d report(s) from an earlier run to deliver first"


@dataclass(frozen=True)
class Report:
    """One status to deliver; also one line of the spool."""

    job_id: int
    web_host: str | None
    status: str
    text: str | None = None
    queue: str | None = None

    def to_line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":")) + "\n"

    @classmethod
    def from_line(cls, line: str) -> Report:
        """Parse one spool line; raise ``ValueError`` if it is not a report."""
        data = json.loads(line)
        if not isinstance(data, dict) or set(data) != {"job_id", "web_host", "status", "text", "queue"}:
            raise ValueError("not a status report")
        if not isinstance(data["job_id"], int) or isinstance(data["job_id"], bool):
            raise ValueError("job_id is not an integer")
        for key in ("web_host", "text", "queue"):
            if data[key] is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} is not a string")
        statuses.check(data["status"])  # UnknownStatus is a ValueError
        return cls(**data)


class Spool:
    """One JSON line per report, oldest first; appended to, and rewritten atomically.

    A damaged line (a crash in the middle of a write) is logged and skipped.
    Errors of the file system are logged, never raised: the statuses are still
    delivered from memory. One spool file serves one reporter at a time.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def load(self) -> list[Report]:
        """The reports left by an earlier run, oldest first (its folder made on demand)."""
        found = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, encoding="utf-8") as spool:
                for number, line in enumerate(spool, 1):
                    if not line.strip():
                        continue
                    try:
                        found.append(Report.from_line(line))
                    except (ValueError, TypeError, UnknownStatus) as exc:
                        log.error(SPOOL_LINE_LOG, self.path, number, exc)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error(SPOOL_ERROR_LOG, self.path, exc)
            return []
        if found:
            log.info(SPOOL_FOUND_LOG, self.path, len(found))
        return found

    def append(self, report: Report) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as spool:
                spool.write(report.to_line())
                spool.flush()
        except OSError as exc:
            log.error(SPOOL_ERROR_LOG, self.path, exc)

    def rewrite(self, reports: Iterable[Report]) -> None:
        """Make the spool hold exactly *reports*, in their order, atomically."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as spool:
                spool.writelines(report.to_line() for report in reports)
                spool.flush()
                os.fsync(spool.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            log.error(SPOOL_ERROR_LOG, self.path, exc)
