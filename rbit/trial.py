"""``rbit try``: one runner on one request, in the foreground, with no broker — the runner author's loop."""

import logging
import time
import traceback

import click

from . import statuses
from .errors import JobOutcome
from .message import Message

log = logging.getLogger(__name__)


def try_runner(section, body, request):
    """Run *section*'s runner on *request* here and now, printing each status; return the final status."""
    reported = []

    def set_status(status, text=None):
        statuses.check(status)
        reported.append(status)
        click.echo(f"status: {status}" + (f" ({text})" if text else ""))

    message = Message(body=body, request=request, queue=section.queue, redelivered=False)
    click.echo(f"running {section.runner!r} on job {request.get_job_id()} "
               f"({request.get_package()} {request.get_version()}) from {section.queue}")
    started = time.monotonic()
    set_status(statuses.BUILDING)
    try:
        section.runner.run(message, set_status)
    except JobOutcome as outcome:
        status, text = outcome.status, outcome.message
    except Exception as exc:
        click.echo(traceback.format_exc().rstrip(), err=True)
        status, text = statuses.FAILED, f"{type(exc).__name__}: {exc}"
    else:
        final = [s for s in reported if s in statuses.FINAL]
        status, text = (final[-1] if final else statuses.DONE), None
    if not reported or reported[-1] != status:
        set_status(status, text)
    click.echo(f"ended {status} in {time.monotonic() - started:.1f} s")
    return status
