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

from ..passwords import without_passwords
from ..errors import Blocked, ConfigError, Failed, UnknownStatus
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

#: Exit status with which a program says its job is Blocked (``EX_TEMPFAIL``).
EXIT_BLOCKED = 75

#: Seconds to wait, after the program exits, for the status lines it wrote last.
STATUS_DRAIN_TIMEOUT = 1.0

#: The environment variable naming the file descriptor that takes status lines.
STATUS_FD_VARIABLE = "RBIT_STATUS_FD"

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

    def run(self, message, set_status) -> None:
        fields = {**message.request.fields(), "QUEUE": message.queue}
        argv = substitute(self.argv, fields)
        read_end, write_end = os.pipe()
        env = job_environment(fields, self.settings)
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
        if code == EXIT_BLOCKED:
            raise Blocked(f"{argv[0]} exited with status {EXIT_BLOCKED} (blocked)")
        if code < 0:
            raise Failed(f"{argv[0]} was killed by {signal.Signals(-code).name}")
        if code:
            raise Failed(f"{argv[0]} exited with status {code}")


def _read_statuses(fd, set_status):
    """Report each ``STATUS [text]`` line the program writes; an unknown one is logged."""
    with open(fd, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            status, _, text = line.strip().partition(" ")
            if not status:
                continue
            try:
                set_status(status, text.strip() or None)
            except UnknownStatus as exc:
                log.error("runner program reported %s; ignored", exc)
