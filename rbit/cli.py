"""The ``rbit`` command line: ``rbit CONFIG [--poll-time SECONDS] [options]`` and its tools."""

import dataclasses
import logging
import logging.handlers
import os
import sys

import click

from . import __version__
from . import config as config_module
from .errors import ConfigError, RbitError

#: Exit status after a clean stop.
RET_OK = 0
#: Exit status for any failure that is not the user's configuration or usage.
RET_ERROR = 1
#: Exit status for a usage or configuration error (click uses 2 for usage errors too).
RET_USAGE = 2
#: Exit status of ``rbit logs --follow`` stopped with Ctrl+C (128 + SIGINT, as a shell reports it).
RET_INTERRUPTED = 130

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("rbit")


class RbitGroup(click.Group):
    """A group whose default command is ``run``: ``rbit CONFIG`` means ``rbit run CONFIG``."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        run = self.commands[self.default_command]
        with click.Context(run, info_name=ctx.info_name, parent=None) as run_ctx:
            run.format_usage(run_ctx, formatter)
            run.format_help_text(run_ctx, formatter)
            run.format_options(run_ctx, formatter)
        self.format_commands(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text(f"Run '{ctx.info_name} COMMAND --help' for a command's own options.")


@click.group(cls=RbitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rbit")
def main():
    """rbit: a build worker for PyBit."""


def load_config(path, poll_time=None):
    """Read the configuration; a mistake ends the program with status 2 and one line."""
    try:
        config = config_module.load(path)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", RET_USAGE)
    if poll_time is not None:
        worker = dataclasses.replace(config.worker, polling_time=poll_time)
        config = dataclasses.replace(config, worker=worker)
    return config


def fail(message, code):
    click.echo(f"rbit: {message}", err=True)
    sys.exit(code)


def setup_logging(verbose, quiet, logfile=None):
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if logfile:
        handler = logging.handlers.WatchedFileHandler(logfile)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not verbose:
        # kombu and amqp speak of every frame at DEBUG; keep them to warnings unless asked.
        for noisy in ("kombu", "amqp", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


@main.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--poll-time", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Longest wait between checks of the connection and the worker's state "
                   "(default: [rbit] polling_time, else 60). Jobs never wait for it.")
@click.option("--check", is_flag=True, help="Check the configuration and import the runners, then exit.")
@click.option("--check-connections", is_flag=True,
              help="With --check: also connect to the broker and to PyBit's web front end.")
@click.option("--daemon", "-d", is_flag=True, help="Detach from the terminal and run in the background.")
@click.option("--pidfile", type=click.Path(dir_okay=False), help="With --daemon: the pid file to hold.")
@click.option("--logfile", type=click.Path(dir_okay=False), help="Log to this file instead of standard error.")
@click.option("--workdir", type=click.Path(file_okay=False), default="/", show_default=True,
              help="With --daemon: the working directory.")
@click.option("--umask", default="022", show_default=True, help="With --daemon: the umask, in octal.")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail, including each status report.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
def run_command(config_path, poll_time, check, check_connections, daemon, pidfile, logfile,
                workdir, umask, verbose, quiet):
    """Serve the queues of CONFIG until Ctrl+C or SIGTERM."""
    config = load_config(config_path, poll_time)
    if check or check_connections:
        from .tools.checks import run_checks

        try:
            config.configure_logging()
        except ConfigError as exc:
            fail(f"configuration error: {exc}", RET_USAGE)

        for warning in config.warnings:
            click.echo(f"warning: {warning}", err=True)
        sys.exit(run_checks(config, connections=check_connections))
    try:
        umask_value = int(umask, 8)
    except ValueError:
        raise click.BadParameter(f"{umask!r} is not an octal number", param_hint="--umask")
    handler = setup_logging(verbose, quiet, logfile)
    try:
        config.configure_logging()
    except ConfigError as exc:
        fail(f"configuration error: {exc}", RET_USAGE)
    for warning in config.warnings:
        log.warning("%s", warning)
    if daemon:
        from .daemon import daemonize

        try:
            daemonize(pidfile=pidfile, workdir=workdir, umask=umask_value, keep=[handler])
        except RbitError as exc:
            fail(str(exc), RET_ERROR)
    sys.exit(serve(config))


def serve(config):
    """Run a worker on *config* until it stops; return the exit status."""
    from .broker import Broker
    from .passwords import forget_passwords
    from .worker import Worker

    # Job processes must not inherit the passwords (the configuration holds them now).
    forget_passwords()
    worker = Worker(config, Broker(config.amqp))
    try:
        worker.run()
    except RbitError as exc:
        log.error("%s", exc)
        return RET_ERROR
    except Exception:
        log.exception("rbit stopped on an unexpected error")
        return RET_ERROR
    return RET_OK


@main.command("recover")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--worker", "worker_name", metavar="NAME",
              help="The worker whose unfinished jobs to put back (default: [rbit] name of CONFIG).")
def recover_command(config_path, worker_name):
    """Put back on their queues the jobs a worker left unfinished.

    A worker does this itself when it starts again; use this command for a
    worker that will not come back. It refuses while that worker is connected.
    """
    from . import queues
    from .errors import QueueLocked

    config = load_config(config_path)
    setup_logging(False, False)
    name = worker_name or config.worker.name
    broker = connected_broker(config)
    try:
        try:
            # Holding the worker's exclusive name queue proves it is not running.
            broker.declare(queues.cancel_queue(name))
        except QueueLocked as exc:
            fail(f"worker {name!r} seems to be connected ({exc}); it recovers its own jobs", RET_ERROR)
        count = queues.recover(broker, name, 0, config.worker.rejected_queue)
    except RbitError as exc:
        fail(str(exc), RET_ERROR)
    finally:
        broker.close()
    click.echo(f"put back {count} unfinished job(s) of worker {name!r}")


def request_options(command):
    """The fields of a build request, as options (shared by ``publish`` and ``try``)."""
    options = [
        click.option("--queue", help="Take dist, arch, suite and format from this runner section's queue "
                                     "(default: the first runner section)."),
        click.option("--job-id", type=int, default=1, show_default=True, help="PyBit job id."),
        click.option("--package", default="hello", show_default=True),
        click.option("--version", "version", default="1.0", show_default=True),
        click.option("--dist", help="Distribution (default: from the queue)."),
        click.option("--arch", help="Architecture (default: from the queue)."),
        click.option("--suite", help="Suite (default: from the queue)."),
        click.option("--format", "format_", help="Format (default: from the queue)."),
        click.option("--method", default="git", show_default=True, help="Transport method (git, svn, ...)."),
        click.option("--uri", default="", help="Transport URI of the source."),
        click.option("--vcs-id", default=None, help="Revision to build."),
        click.option("--web-host", default="localhost:8080", show_default=True,
                     help="PyBit web front end (host:port) the statuses go to."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def section_for(config, queue):
    """The runner section of ``--queue``, or the first one."""
    try:
        return config.runner_for(queue) if queue else config.runners[0]
    except KeyError:
        raise click.BadParameter(f"no [runner:{queue}] section in {config.path}", param_hint="--queue")


def build_request_from(config, queue, fields):
    """The routing key and BuildRequest that the command line's fields describe."""
    from .errors import BadMessage
    from .tools.publish import request_from_fields

    section = section_for(config, queue)
    parts = section.routing_key.split(".")
    if len(parts) != 4:
        parts = [None] * 4
    for index, key in enumerate(("dist", "arch", "suite", "format")):
        fields[key] = fields.get(key) or parts[index]
        if not fields[key]:
            raise click.BadParameter(f"give --{key}: the queue {section.queue} does not say it")
    try:
        request = request_from_fields(fields)
    except BadMessage as exc:
        raise click.BadParameter(exc.reason)
    return ".".join(fields[k] for k in ("dist", "arch", "suite", "format")), section, request


@main.command("publish")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@request_options
@click.option("--print-body", is_flag=True, help="Also print the JSON body sent.")
def publish_command(config_path, queue, print_body, format_, **fields):
    """Put a build request on the broker of CONFIG, exactly as PyBit's web front end does."""
    from .tools.publish import publish_request

    config = load_config(config_path)
    fields["format"] = format_
    routing_key, _, request = build_request_from(config, queue, fields)
    try:
        body = publish_request(config.amqp, routing_key, request)
    except RbitError as exc:
        fail(str(exc), RET_ERROR)
    except Exception as exc:
        fail(f"cannot publish: {type(exc).__name__}: {exc}", RET_ERROR)
    click.echo(f"published job {request.get_job_id()} ({request.get_package()} {request.get_version()}) "
               f"with routing key {routing_key}")
    if print_body:
        click.echo(body)


def connected_broker(config):
    """A Broker connected once (no waiting): the tools report a broker that is down and exit."""
    from .broker import Broker

    broker = Broker(config.amqp)
    try:
        broker.connect_once()
    except RbitError as exc:
        fail(str(exc), RET_ERROR)
    return broker


@main.command("status")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
def status_command(config_path):
    """Show the queues CONFIG serves, the jobs in progress, the rejected messages, and every worker on the vhost."""
    from .tools.overview import format_rows, format_workers, queue_rows, worker_rows

    config = load_config(config_path)
    broker = connected_broker(config)
    try:
        click.echo(f"worker {config.worker.name} on {broker.address} "
                   f"vhost {config.amqp.virtual_host}, {config.amqp.queue_type} queues")
        click.echo(format_rows(queue_rows(broker, config)))
        click.echo()
        click.echo(format_workers(worker_rows(broker)))
    except RbitError as exc:
        fail(str(exc), RET_ERROR)
    finally:
        broker.close()


@main.command("try")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@request_options
@click.option("--body-file", type=click.File("rb"), help="Read the request from this file (a PyBit JSON body) "
                                                         "instead of the fields.")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
def try_command(config_path, queue, body_file, verbose, format_, **fields):
    """Run one runner section on one request here, with no broker, printing its statuses.

    Exit status 0 when the job ends Done, 1 otherwise.
    """
    from .errors import BadMessage
    from .pybit import decode_build_request, encode
    from .tools.trial import try_runner

    config = load_config(config_path)
    setup_logging(verbose, False)
    config.configure_logging()
    fields["format"] = format_
    if body_file is not None:
        raw = body_file.read()
        try:
            request = decode_build_request(raw)
        except BadMessage as exc:
            fail(f"{body_file.name}: not a build request rbit would run: {exc.reason}", RET_USAGE)
        section = section_for(config, queue)
        body = raw.decode("utf-8")
    else:
        _, section, request = build_request_from(config, queue, fields)
        body = encode(request)
    status = try_runner(section, body, request)
    sys.exit(RET_OK if status == "Done" else RET_ERROR)


@main.command("logs")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("job_id", metavar="JOB", type=click.IntRange(min=0))
@click.option("--follow", "-f", is_flag=True,
              help="Then print each new line as it is written, until the job ends.")
@click.option("--attempt", type=click.IntRange(min=1), help="An earlier attempt (default: the newest).")
def logs_command(config_path, job_id, follow, attempt):
    """Print a job's log, from [rbit] log_dir or, failing that, from the worker's [rbit] http."""
    from .tools.logs import show

    config = load_config(config_path)
    try:
        code = show(config.worker, job_id, sys.stdout.buffer, follow, attempt)
    except RbitError as exc:
        fail(str(exc), RET_ERROR)
    except KeyboardInterrupt:
        code = RET_INTERRUPTED
    except BrokenPipeError:  # rbit logs ... | head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = RET_OK
    sys.exit(code)


@main.command("rejected")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Look at no more than this many messages.")
@click.option("--requeue", "requeue", multiple=True, type=int, metavar="N",
              help="Put message N (as numbered in the listing) back on the queue it came from. Repeatable.")
@click.option("--requeue-all", is_flag=True, help="Put every listed message back on the queue it came from.")
@click.option("--bodies", is_flag=True, help="Print whole bodies, not a preview.")
def rejected_command(config_path, limit, requeue, requeue_all, bodies):
    """List the messages in the rejected queue, and put chosen ones back.

    Messages not put back stay in the rejected queue, in their order.
    """
    from . import queues
    from .tools.rejected import describe, preview

    config = load_config(config_path)
    broker = connected_broker(config)
    queue_name = config.worker.rejected_queue
    try:
        with broker.take(queue_name, limit) as batch:
            if not batch.messages:
                click.echo(f"{queue_name}: empty")
            for number, message in enumerate(batch.messages, 1):
                click.echo(f"[{number}] {describe(message)}")
                click.echo(f"    {message.text if bodies else preview(message.body)}")
                if requeue_all or number in requeue:
                    queue = queues.unreject(broker, message)
                    if queue is None:
                        click.echo("    cannot put back: the message does not say where it came from", err=True)
                        continue
                    message.ack()
                    click.echo(f"    put back on {queue}")
    except RbitError as exc:
        fail(str(exc), RET_ERROR)
    finally:
        broker.close()
