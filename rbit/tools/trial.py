"""``rbit try``: one runner on one request, in the foreground, with no broker — the runner author's loop."""

from __future__ import annotations

import time

import click

from .. import statuses
from ..message import Message
from ..outcome import call_runner, decide


def try_runner(section, body: str, request) -> str:
    """Run *section*'s runner on *request* here and now, printing each status; return the final status.

    The job ends by the same rule as in the worker (:func:`rbit.outcome.decide`).
    """
    last_final = None

    def set_status(status, text=None):
        nonlocal last_final
        statuses.check(status)
        if status in statuses.FINAL:
            last_final = status
        click.echo(f"status: {status}" + (f" ({text})" if text else ""))

    message = Message(body=body, request=request, queue=section.queue, redelivered=False)
    click.echo(f"running {section.runner!r} on job {request.get_job_id()} "
               f"({request.get_package()} {request.get_version()}) from {section.queue}")
    started = time.monotonic()
    result = call_runner(section.runner, message, set_status)
    decision = decide(result, last_final=last_final, timeout=section.timeout)
    if decision.status is not None:
        set_status(decision.status, decision.text)
    click.echo(f"ended {decision.outcome} in {time.monotonic() - started:.1f} s")
    return decision.outcome
