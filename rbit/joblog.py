"""One attempt's log file (see :mod:`rbit.logdir` for where): bounded to its head and tail,
readable while it grows.

A log grows as a plain file up to ``log_max``. Past that, the file keeps its
first half (the head) and the newest bytes go to a ring, ``ATTEMPT.tail``, of
the size of the rest; when the job ends the file gets a line saying how many
bytes were left out, then the ring in order. The file therefore never grows
past ``log_max`` (plus that line).

Offsets (:meth:`JobLog.read`) count the bytes of the log as it was written:
in a log that passed its cap, a reader whose offset fell in the part left
out gets a line saying so, then the tail.

A write that fails (a full disk, an I/O error) loses that output, never the
job: the log says how many bytes were lost, where, and why, once writing
works again or when the job ends.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from pathlib import Path

from .logdir import attempts, read_file, write_meta

log = logging.getLogger(__name__)

#: Bytes kept for the line that says what was left out, so the file stays within log_max.
MARKER_RESERVE = 256

#: The smallest log_max (a head, a tail and the marker line must fit).
MIN_LOG_MAX = 4096

#: Read chunk when copying within files.
_COPY_CHUNK = 1 << 20


class JobLog:
    """One attempt's log. The worker's loop writes; other threads may read at any time."""

    def __init__(self, path: Path | None, max_bytes: int, fd: int | None = None, error: str | None = None,
                 meta: dict | None = None, echo=None):
        self.path = path
        self.max_bytes = max_bytes
        self.head_cap = max_bytes // 2
        self.ring_cap = max(1, max_bytes - self.head_cap - MARKER_RESERVE)
        self.fd = fd
        #: Why the file could not be opened (its output is then counted as lost).
        self.error = error
        self.meta = dict(meta or {})
        self.echo = echo
        self._echo_rest = b""
        self.lock = threading.Lock()
        #: Bytes of the log so far (its stream's end offset).
        self.size = 0
        self.ring = None  # fd of ATTEMPT.tail once the log passed log_max
        self.left_out = 0
        self.marker = b""  # the line written where the middle was left out, once ended
        self.lost = 0  # bytes lost since the last notice of a loss
        self.lost_total = 0
        self.lost_reason = error
        self.last_byte = b"\n"
        self.ended = False

    @classmethod
    def open(cls, log_dir: Path, job_id: int, max_bytes: int, meta: dict, echo=None) -> JobLog:
        """A new attempt's log in *log_dir*; on failure, one that loses its output (see :attr:`error`)."""
        directory = Path(log_dir) / str(job_id)
        try:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            attempt = (attempts(log_dir, job_id) or [0])[-1] + 1
            while True:
                path = directory / f"{attempt}.log"
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
                    break
                except FileExistsError:
                    attempt += 1
        except OSError as exc:
            return cls(None, max_bytes, error=f"{exc.strerror}: {exc.filename}", meta={"job": job_id, **meta},
                       echo=echo)
        meta = {"job": job_id, "attempt": attempt, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), **meta}
        joblog = cls(path, max_bytes, fd, meta=meta, echo=echo)
        write_meta(path.with_suffix(".json"), meta)
        return joblog

    @property
    def attempt(self) -> int | None:
        return self.meta.get("attempt")

    # -- Writing (the worker's loop) --------------------------------------------

    def write(self, data: bytes) -> None:
        """Add what the job wrote."""
        if not data:
            return
        with self.lock:
            self._append(data)
        if self.echo is not None:
            self._echo(data)

    def note(self, text: str) -> None:
        """Write a line of rbit's own, on a line of its own."""
        with self.lock:
            prefix = b"" if self.last_byte == b"\n" else b"\n"
            self._append(prefix + text.encode("utf-8", "replace") + b"\n")

    def close(self, end_line: str, **end) -> None:
        """Write *end_line*, put the tail in place, and record how the attempt ended (*end*)."""
        if self.ended:
            return
        self.note(end_line)
        with self.lock:
            self.ended = True
            if self.lost and not self._store(self._loss_notice(), notice=True):
                self._overwrite_end(self._loss_notice())
            if self.ring is not None:
                self._unroll_ring()
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self.meta.update(end, ended=time.time(), bytes=self.size, left_out=self.left_out,
                             lost=self.lost_total)
            if self.path is not None:
                write_meta(self.path.with_suffix(".json"), self.meta)
        if self.echo is not None and self._echo_rest:
            self.echo(self._echo_rest.decode("utf-8", "replace"))
            self._echo_rest = b""

    def _append(self, data: bytes) -> None:
        """Store *data*, after the notice of any output lost before it."""
        if self.lost:
            if not self._store(self._loss_notice(), notice=True):
                self._lose(len(data), None)
                return
            self.lost = 0
        self._store(data)

    def _store(self, data: bytes, notice: bool = False) -> bool:
        """Put *data* at the end of the log, keeping the cap; False on failure (the loss counted,
        unless *data* is rbit's notice of an earlier loss)."""
        if self.fd is None:
            if not notice:
                self._lose(len(data), None)
            return False
        data = memoryview(data)
        try:
            if self.ring is None:
                room = self.head_cap + self.ring_cap - self.size
                if len(data) <= room:
                    self._write_main(data)
                    return True
                self._write_main(data[:room])
                data = data[room:]
                self._start_ring()
            self._ring_write(data)
            self.last_byte = bytes(data[-1:])
            return True
        except OSError as exc:
            if notice:
                self.lost_reason = exc.strerror or self.lost_reason
            else:
                self._lose(len(data) - getattr(exc, "landed", 0), exc)
            return False

    def _write_main(self, data: memoryview) -> None:
        """Append to the log file; what lands before an error stays part of the log."""
        try:
            _pwrite_all(self.fd, data, self.size)
        except OSError as exc:
            exc.landed = getattr(exc, "written", 0)
            self.size += exc.landed
            if exc.landed:
                self.last_byte = bytes(data[exc.landed - 1:exc.landed])
            raise
        self.size += len(data)
        self.last_byte = bytes(data[-1:])

    def _start_ring(self) -> None:
        """The log reached log_max: its part past the head becomes the ring's first content."""
        ring_path = self.path.with_suffix(".tail")
        ring = os.open(ring_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            _copy(self.fd, self.head_cap, ring, 0, self.ring_cap)
            os.ftruncate(self.fd, self.head_cap)
        except OSError:
            os.close(ring)
            os.unlink(ring_path)
            raise
        self.ring = ring

    def _ring_write(self, data: memoryview) -> None:
        if len(data) > self.ring_cap:
            skipped = len(data) - self.ring_cap
            self.size += skipped
            data = data[skipped:]
        position = (self.size - self.head_cap) % self.ring_cap
        first = min(len(data), self.ring_cap - position)
        _pwrite_all(self.ring, data[:first], position)
        _pwrite_all(self.ring, data[first:], 0)
        self.size += len(data)
        self.left_out = self.size - self.head_cap - self.ring_cap

    def _unroll_ring(self) -> None:
        """Append the marker and the ring, oldest byte first, to the head; remove the ring."""
        start = (self.size - self.head_cap) % self.ring_cap
        prefix = b"" if os.pread(self.fd, 1, self.head_cap - 1) == b"\n" else b"\n"
        self.marker = prefix + (
            f"[rbit: {self.left_out} bytes left out here: this log keeps its first {self.head_cap} "
            f"and its last {self.ring_cap} bytes (log_max {self.max_bytes})]\n").encode()
        try:
            _pwrite_all(self.fd, self.marker, self.head_cap)
            at = self.head_cap + len(self.marker)
            _copy(self.ring, start, self.fd, at, self.ring_cap - start)
            _copy(self.ring, 0, self.fd, at + self.ring_cap - start, start)
            os.ftruncate(self.fd, at + self.ring_cap)
        except OSError as exc:
            self.lost_total += self.ring_cap
            self.lost_reason = exc.strerror
            log.warning("cannot put the tail of %s in place (%s); it is lost", self.path, exc.strerror)
            try:
                os.ftruncate(self.fd, self.head_cap + len(self.marker))
            except OSError:
                pass
        os.close(self.ring)
        self.ring = None
        try:
            os.unlink(self.path.with_suffix(".tail"))
        except OSError:
            pass

    def _overwrite_end(self, notice: bytes) -> None:
        """On a full disk, the notice of the loss replaces the log's last bytes (no new blocks needed)."""
        if self.fd is None or self.ring is not None or self.size < len(notice):
            return
        try:
            _pwrite_all(self.fd, notice, self.size - len(notice))
        except OSError:
            pass

    def _lose(self, count: int, exc: OSError | None) -> None:
        first = self.lost == 0 and self.lost_total == 0
        self.lost += count
        self.lost_total += count
        if exc is not None:
            self.lost_reason = exc.strerror or errno.errorcode.get(exc.errno, str(exc))
        if first:
            log.warning("job %s: cannot write its log%s (%s): its output is lost until it can",
                        self.meta.get("job"), f" {self.path}" if self.path else "", self.lost_reason)

    def _loss_notice(self) -> bytes:
        prefix = b"" if self.last_byte == b"\n" else b"\n"
        return prefix + f"[rbit: {self.lost} bytes of output lost here: {self.lost_reason}]\n".encode()

    def _echo(self, data: bytes) -> None:
        *lines, self._echo_rest = (self._echo_rest + data).split(b"\n")
        for line in lines:
            self.echo(line.decode("utf-8", "replace"))

    # -- Reading (any thread) ---------------------------------------------------

    def read(self, offset: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        """Up to *limit* bytes of the log from *offset*, and the offset that follows them."""
        with self.lock:
            end = self.size
            if offset >= end:
                return b"", end
            head = self.head_cap
            capped = self.ring is not None or self.marker
            if not capped or offset < head:
                data = self._pread_main(offset, min(limit, (head if capped else end) - offset))
                return data, offset + len(data)
            tail_start = end - self.ring_cap
            notice = b""
            if offset < tail_start:
                notice = f"\n[rbit: {tail_start - offset} bytes left out here]\n".encode()
                offset = tail_start
            count = min(limit, end - offset)
            if self.ring is not None:
                position = (offset - head) % self.ring_cap
                first = min(count, self.ring_cap - position)
                data = os.pread(self.ring, first, position) + os.pread(self.ring, count - first, 0)
            else:
                data = self._pread_main(head + len(self.marker) + offset - tail_start, count)
            return notice + data, offset + len(data)

    def _pread_main(self, offset: int, count: int) -> bytes:
        if self.fd is not None:
            return os.pread(self.fd, count, offset)
        return read_file(self.path, offset, count) if self.path else b""


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of *data* at *offset*; an OSError says in ``written`` how much landed before it."""
    view = memoryview(data)
    written = 0
    while view:
        try:
            count = os.pwrite(fd, view, offset + written)
        except OSError as exc:
            exc.written = written
            raise
        view = view[count:]
        written += count


def _copy(source: int, source_offset: int, target: int, target_offset: int, count: int) -> None:
    """Copy *count* bytes between files, in the kernel where it can."""
    while count > 0:
        try:
            done = os.copy_file_range(source, target, min(count, 1 << 30), source_offset, target_offset)
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                                              errno.EOPNOTSUPP):
                raise
            chunk = os.pread(source, min(count, _COPY_CHUNK), source_offset)
            if not chunk:
                raise OSError(errno.EIO, "short read while copying the log") from None
            _pwrite_all(target, chunk, target_offset)
            done = len(chunk)
        if done == 0:
            raise OSError(errno.EIO, "short copy of the log")
        source_offset += done
        target_offset += done
        count -= done
