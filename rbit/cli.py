"""The ``rbit`` command line: ``rbit CONFIG [--poll-time SECONDS] [options]`` and its tools."""

import dataclasses
import logging
import logging.handlers
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
        from .checks import run_checks

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
    if daemon:
        from .daemon import daemonize

        try:
            daemonize(pidfile=pidfile, workdir=workdir, umask=umask_value, keep=[handler])
        except RbitError as exc:
            fail(str(exc), RET_ERROR)
    sys.exit(serve(config))


def serve(config):
    """Run a worker on *config* until it stops; return the exit status."""
    from .worker import Worker

    worker = Worker(config)
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
    from .broker import Broker, cancel_queue
    from .worker import recover

    config = load_config(config_path)
    setup_logging(False, False)
    name = worker_name or config.worker.name
    broker = Broker(config.amqp)
    try:
        broker.connect(should_stop=lambda: True)
        try:
            # Holding the worker's exclusive name queue proves it is not running.
            cancel_queue(name)(broker.channel).declare()
        except broker.errors as exc:
            fail(f"worker {name!r} seems to be connected ({exc}); it recovers its own jobs", RET_ERROR)
        count = recover(broker, name, 0, config.worker.rejected_queue)
    except RbitError as exc:
        fail(str(exc), RET_ERROR)
    except Exception as exc:
        fail(f"cannot reach the broker: {exc}", RET_ERROR)
    finally:
        broker.close()
    click.echo(f"put back {count} unfinished job(s) of worker {name!r}")
