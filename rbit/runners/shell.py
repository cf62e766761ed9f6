"""The ``shell!PROGRAM ARG ...`` processor: runs a program, never through a shell.

The line is split once, when the configuration is read, the way a POSIX shell
splits words (quotes group, backslash escapes; nothing is expanded). Each
placeholder is then replaced inside the one argument that holds it, so no
value from a message can add an argument or reach a shell.
"""

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading

from ..child import STATUS_FD_VARIABLE
from ..errors import Blocked, ConfigError, Failed, JobOutcome, UnknownStatus
from ..passwords import without_passwords
from . import Runner

log = logging.getLogger(__name__)

#: Placeholders and the request field each stands for (``%%`` is a literal ``%``).
PLACEHOLDERS = (
    "ID", "PACKAGE", "VERSION", "DIST", "ARCH", "SUITE", "FORMAT",
    "BUILDENV", "METHOD", "URI", "VCS_ID", "WEB_HOST", "QUEUE",
)


def placeholder_pattern(names) -> re.Pattern:
    """A regex matching ``%NAME`` for *names* and ``%%``; longest names first, so that
    ``%VCS_ID`` is not read as ``%VCS`` + ``_ID``."""
    return re.compile("%(%|" + "|".join(sorted(names, key=len, reverse=True)) + ")")


_PLACEHOLDER = placeholder_pattern(PLACEHOLDERS)
_ANY_PERCENT = re.compile(r"%(.|$)")

LOG_UNKNOWN_STATUS = "runner program reported %s; ignored"

#: Exit status with which a program says its job is Blocked (``EX_TEMPFAIL``).
EXIT_BLOCKED = 75

#: Seconds to wait, after the program exits, for the status lines it wrote last.
STATUS_DRAIN_TIMEOUT = 1.0

_SETTING_NAME = re.compile(r"[^A-Za-z0-9]")


def split(line: str) -> list[str]:
    """Split a runner line into arguments like a POSIX shell, without expanding anything."""
    try:
        argv = shlex.split(line, comments=False, posix=True)
    except ValueError as exc:
        raise ConfigError(f"cannot split shell!{line}: {exc}") from None
    for arg in argv:
        for match in _ANY_PERCENT.finditer(arg):
            if not _PLACEHOLDER.match(arg, match.start()):
                raise ConfigError(
                    f"unknown placeholder {match.group(0)!r} in {arg!r}; known: "
                    + ", ".join("%" + name for name in PLACEHOLDERS) + ", %%"
                )
    return argv


def substitute(argv: list[str], fields: dict, pattern: re.Pattern = _PLACEHOLDER) -> list[str]:
    """Replace placeholders inside each argument; the number of arguments never changes."""

    def value(match):
        name = match.group(1)
        return "%" if name == "%" else fields.get(name, "")

    return [pattern.sub(value, arg) for arg in argv]


def job_environment(fields: dict, settings: dict, base=None) -> dict[str, str]:
    """The program's environment: the worker's (less rbit's secrets), the job's fields, the settings."""
    env = without_passwords(os.environ if base is None else base)
    env.update({f"RBIT_{name}": fields.get(name, "") for name in PLACEHOLDERS})
    env.update(
        {f"RBIT_SETTING_{_SETTING_NAME.sub('_', key).upper()}": value
         for key, value in settings.items()}
    )
    return env


class ShellRunner(Runner):
    """Runs a program; its exit status gives the outcome, fd ``$RBIT_STATUS_FD`` takes statuses."""

    def __init__(self, spec, settings):
        super().__init__(spec, settings)
        self.argv = split(spec)
        program = self.argv[0]
        if "%" not in program and shutil.which(program) is None:
            raise ConfigError(f"program {program!r} is not found or not executable")

    def program(self, message) -> tuple[list[str], dict[str, str]]:
        """The program and environment for *message*: the job's process becomes it."""
        fields = {**message.request.fields(), "QUEUE": message.queue}
        return substitute(self.argv, fields), job_environment(fields, self.settings)

    def run(self, message, set_status) -> None:
        """Run the program as a child of this process (``rbit try`` does; a worker's job becomes it)."""
        argv, env = self.program(message)
        read_end, write_end = os.pipe()
        env[STATUS_FD_VARIABLE] = str(write_end)
        try:
            process = subprocess.Popen(argv, env=env, pass_fds=(write_end,), stdin=subprocess.DEVNULL)
        except OSError as exc:
            os.close(read_end)
            raise Failed(f"cannot start {argv[0]}: {exc.strerror}") from None
        finally:
            os.close(write_end)
        reader = threading.Thread(target=_read_statuses, args=(read_end, set_status), daemon=True)
        reader.start()
        code = process.wait()
        # A background process the program left may hold the status pipe open:
        # the job ends with the program, and its process group is killed then.
        reader.join(timeout=STATUS_DRAIN_TIMEOUT)
        outcome = exit_outcome(code, argv[0])
        if outcome is not None:
            raise outcome


def exit_outcome(code: int, program: str) -> JobOutcome | None:
    """What a program's exit status *code* (negative: killed by that signal) says of its job:
    None for Done, else the Blocked or Failed to raise."""
    if code == EXIT_BLOCKED:
        return Blocked(f"{program} exited with status {EXIT_BLOCKED} (blocked)")
    if code < 0:
        return Failed(f"{program} was killed by {signal.Signals(-code).name}")
    if code:
        return Failed(f"{program} exited with status {code}")
    return None


def status_line(line: str) -> tuple[str, str | None] | None:
    """``(status, text)`` of a ``STATUS [text]`` line a program wrote; None for a blank one."""
    status, _, text = line.strip().partition(" ")
    return (status, text.strip() or None) if status else None


def report_status_line(line: str, set_status) -> None:
    """Report one status line; an unknown status is logged as an error, not reported."""
    found = status_line(line)
    if found is None:
        return
    try:
        set_status(*found)
    except UnknownStatus as exc:
        log.error(LOG_UNKNOWN_STATUS, exc)


def _read_statuses(fd, set_status):
    """Report each status line the program writes."""
    with open(fd, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            report_status_line(line, set_status)
