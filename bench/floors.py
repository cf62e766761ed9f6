"""The floors set by rbit's promises, measured apart from rbit's worker loop.

Every job costs two things rbit has promised, whatever its code does around them:

* **the broker steps** (:func:`broker_floor`): per message, a copy published to
  the in-progress queue with a publisher confirm (a wait), ``basic.cancel`` of
  the consumers without waiting (the last slot fills), the original's
  ``basic.ack``, a purge of the in-progress queue without waiting, on the
  copies' channel (the next copy's confirm shows it done), and
  ``basic.consume`` again (one wait, for the last queue). Written with kombu
  and py-amqp only, not rbit's broker code, so that it is a floor independent
  of rbit's code;
* **a fresh process per job** (:func:`process_floor`): a process forked from
  rbit's fork server (:func:`rbit.jobs.fork_server`), in its own session and
  process group, holding the lifeline and the lease, given its job down its pipe
  (:class:`rbit.jobs.JobProcess`), waited for until it exits, then closed;
  strictly one after the other, and with the next process started while the
  current one runs, as ``rbit.running.Jobs.warm_up`` does;
* **the two together** (:func:`combined_floor`): one bare loop doing both per
  message, as a worker of concurrency 1 must (the job offered to its process
  while the broker confirms the copy, told to go after the ack, the next
  process started while it runs), with no rbit worker loop, job log, status
  report or PyBit. The measured floor a throughput target is judged against;
* **the pickup** (:func:`pickup_floor`): the same loop, idle between
  messages, for messages published one at a time by the benchmark, whose
  runner stamps its start as the worker's does: the floor the pickup latency
  is judged against, with the copy's confirm alone timed too.

Every loop takes a message in rbit's order: the copy sent to the in-progress
queue, the consumers cancelled (nowait) and the job offered to its waiting
process while the broker confirms the copy, then the confirm waited for, the
original acknowledged, and the process told to go.

``python bench/floors.py process COUNT`` prints the process floor as JSON,
``python bench/floors.py combined COUNT --url URL`` the combined one, and
``python bench/floors.py pickup COUNT --url URL --report-to HOST:PORT`` takes
COUNT messages the benchmark publishes; the benchmark runs them so, each in a
process of its own, so that the fork server it starts and the bench's own
threads stay apart.
"""

import argparse
import contextlib
import json
import select
import sys
import time
import types
from pathlib import Path

import amqp
from kombu import Connection, Consumer, Queue

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

#: The header rbit's in-progress copy carries (rbit.queues.HEADER_QUEUE), written out: no rbit import.
COPY_HEADER = "x-rbit-queue"

#: The runner lines of the process floor, by kind.
PROCESS_RUNNERS = {"python": "python!runners:noop", "shell": "shell!/bin/true"}

#: Untimed jobs before each timed loop (the fork server's first forks, imports).
WARM_UP = 5


# -- The broker steps, no process ------------------------------------------------------


def _forget_tag(channel, tag):
    """What py-amqp forgets of a consumer at its ``cancel_ok``, which a nowait cancel never gets."""
    channel.callbacks.pop(tag, None)
    channel.cancel_callbacks.pop(tag, None)
    channel.no_ack_consumers.discard(tag)


def _cancel_nowait(consumer):
    """``basic.cancel`` (nowait) of every queue *consumer* consumes, and its callbacks dropped."""
    channel = consumer.channel
    for tag in consumer._active_tags.values():
        channel.basic_cancel(tag, nowait=True)
        _forget_tag(channel, tag)
    consumer._active_tags.clear()
    getattr(consumer, "_active_queue_no_ack", {}).clear()  # kombu 5.5 and later


def served_queues(served):
    """The names of the *served* queues a floor's loop consumes; messages wait in the first."""
    return [f"floor.served.{index}" for index in range(served)]


def _preload(url, bodies, served, timeout):
    """Declare *served* queues and the in-progress queue, empty them, and load *bodies* into the first.

    Returns the served queues' names and the in-progress queue's, once the first holds every body.
    """
    queues = served_queues(served)
    in_progress = "floor.in-progress"
    count = len(bodies)
    with Connection(url) as loader:
        channel = loader.channel()
        for name in [*queues, in_progress]:
            channel.queue_declare(name, durable=True, auto_delete=False)
            channel.queue_purge(name)
        for body in bodies:
            channel.basic_publish(amqp.Message(body, delivery_mode=2, content_type="application/json"),
                                  exchange="", routing_key=queues[0])
        deadline = time.monotonic() + timeout
        while channel.queue_declare(queues[0], passive=True).message_count < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"floor: {queues[0]} does not hold the {count} messages")
            time.sleep(0.01)
    return queues, in_progress


def _consuming(conn, queues):
    """The consumer channel (prefetch 1, ``basic.qos`` global, as rbit's), a publisher channel in
    confirm mode, and a consumer of every queue in *queues*, consuming; its deliveries are appended
    to the list returned last."""
    channel = conn.channel()
    publisher = conn.channel()
    publisher.confirm_select()
    channel.basic_qos(prefetch_size=0, prefetch_count=1, a_global=True)
    pending = []
    consumer = Consumer(channel, queues=[Queue(name, no_declare=True) for name in queues],
                        on_message=pending.append, auto_declare=False, tag_prefix="floor.")
    consumer.consume()
    return channel, publisher, consumer, pending


def _send_copy(publisher, delivery, queue, in_progress):
    """Publish the in-progress copy of *delivery* (from *queue*); its confirm is waited for by
    :func:`_confirmed`, after what is done meanwhile."""
    copy = amqp.Message(delivery.body, delivery_mode=2, content_type="application/json",
                        application_headers={COPY_HEADER: queue})
    publisher.basic_publish(copy, exchange="", routing_key=in_progress)


def _confirmed(publisher):
    """Wait for the broker's confirm of the copy sent last on *publisher*."""
    def refused(method, *args):
        if method == amqp.spec.Basic.Nack:
            raise RuntimeError("floor: the broker refused a copy (basic.nack)")

    publisher.wait([amqp.spec.Basic.Ack, amqp.spec.Basic.Nack], callback=refused)


def _next_delivery(conn, pending, deadline, what):
    """The next delivery, draining the connection's events until one comes or *deadline* passes."""
    while not pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: time box reached")
        conn.drain_events(timeout=max(0.1, deadline - time.monotonic()))
    return pending.pop(0)


def broker_floor(url, bodies, served=5, timeout=60.0):
    """Messages/s of the promises' broker steps alone, over *bodies* pre-loaded in one of *served* queues.

    *url* names a vhost of its own. The consumer channel has a prefetch of 1
    shared by its consumers (``basic.qos`` global), as rbit's; it consumes
    *served* queues (the worker under test serves that many, and each
    ``basic.cancel`` and ``basic.consume`` is per queue); the messages wait in
    the first. For each message, in rbit's order: the copy published on a
    second channel, ``basic.cancel`` of every consumer (nowait) while the
    broker confirms it, the confirm, ``basic.ack``, ``queue.purge`` of the in-progress queue (nowait,
    on the copies' channel, so that the broker does it before the next copy),
    and ``basic.consume`` of every queue again (nowait but the last). The rate
    is the messages over the time from the first delivery to the last
    ``consume_ok``. Returns a dict of figures.
    """
    queues, in_progress = _preload(url, bodies, served, timeout)
    count = len(bodies)
    with Connection(url) as conn:
        _, publisher, consumer, pending = _consuming(conn, queues)
        first = last = None
        deadline = time.monotonic() + timeout
        for _ in range(count):
            message = _next_delivery(conn, pending, deadline, "broker floor")
            if first is None:
                first = time.perf_counter()
            _send_copy(publisher, message, queues[0], in_progress)
            _cancel_nowait(consumer)
            _confirmed(publisher)
            message.ack()
            publisher.queue_purge(in_progress, nowait=True)  # before the next copy, on its channel
            consumer.consume()  # nowait but the last queue's; a delivery during that wait goes to pending
            last = time.perf_counter()
        _cancel_nowait(consumer)
    return {"broker_floor_rate": count / (last - first), "broker_floor_n": count, "broker_floor_queues": served}


# -- A fresh process per job, no broker -----------------------------------------------


def _job_message():
    """A rbit Message of a PyBit build request, as a job gets it."""
    from rbit.message import Message
    from rbit.pybit import decode_build_request, encode, make_request

    body = encode(make_request(1, "hello", "1.0", "bench", "any", "x", "x"))
    return Message(body=body, request=decode_build_request(body), queue="floor")


def _run_to_exit(process):
    """Wait for the job's end as the worker does: its result and its output's end (a python! job), or
    the exit the fork server reports; then release it. 0 for a job that sent its result."""
    while True:
        process.receive()
        process.read_output()
        if process.exited():  # it also kills what is left of the job's group, as the worker's
            break
        watched = [process.server.sock] + [pipe for pipe, done in ((process.conn, process.eof),
                                                                   (process.output, process.output_eof)) if not done]
        select.select(watched, [], [], 1.0)
    process.close()
    return 0 if process.finished else process.exitcode


def _process_starter(runners):
    """A function that starts a job process, waiting for its job, from rbit's fork server, which
    preloads the modules of *runners* as the worker's does; each process holds a lease as the
    worker's do, one that never runs out here."""
    from rbit import jobs
    from rbit.lease import clock

    forks = jobs.fork_server(jobs.runner_modules([types.SimpleNamespace(runner=runner) for runner in runners]))
    lease = clock() + 3600.0

    def started():
        process = jobs.JobProcess(forks)
        process.start(lease=lease)
        return process

    return started


def process_loop(started, runner, message, count, overlapped):
    """Processes/s of *count* jobs: start (with *started*), begin, wait for the exit, close; the
    next started after the exit (sequential) or right after the current one's begin (*overlapped*)."""
    failed = 0
    waiting = started() if overlapped else None
    t0 = time.perf_counter()
    for _ in range(count):
        current = waiting if overlapped else started()
        current.begin(runner, message)
        if overlapped:
            waiting = started()  # as Jobs.start calls warm_up right after begin
        failed += _run_to_exit(current) != 0
    took = time.perf_counter() - t0
    if waiting is not None:  # the one started for a next job that does not come
        waiting.kill()
        _run_to_exit(waiting)
    return count / took, failed


def process_floor(count, rounds=3):
    """The process floor of a no-op python! and a shell!/bin/true job, sequential and overlapped.

    Each loop is run in *rounds* rounds of ``count // rounds`` jobs, the
    sequential and overlapped rounds taking turns, so that a burst of load from
    elsewhere on the machine falls on both; the floor is the fastest round (the
    rate over all rounds is given too). Returns ``{kind: {mode: rate, mode + "_all": rate}}``.
    """
    sys.path[:0] = [str(ROOT), str(BENCH)]
    from rbit.runners import load

    runners = {kind: load(line, {}) for kind, line in PROCESS_RUNNERS.items()}
    started = _process_starter(runners.values())
    message = _job_message()
    per_round = max(1, count // rounds)
    figures = {"n": per_round * rounds, "rounds": rounds, "failed": []}
    for kind, runner in runners.items():
        rates = {"sequential": [], "overlapped": []}
        for mode in rates:
            process_loop(started, runner, message, WARM_UP, mode == "overlapped")
        for _ in range(rounds):
            for mode, found in rates.items():
                rate, failed = process_loop(started, runner, message, per_round, mode == "overlapped")
                found.append(rate)
                if failed:
                    figures["failed"].append(f"{kind} {mode}: {failed} of {per_round} exited non-zero")
        figures[kind] = {}
        for mode, found in rates.items():
            figures[kind][mode] = max(found)
            figures[kind][f"{mode}_all"] = len(found) / sum(1 / rate for rate in found)
    return figures


# -- The two together: the broker steps and a fresh process per job -------------------


def _take(loop, delivery, runner):
    """Take *delivery* as rbit does, up to its job running; the process running it.

    The request decoded into a rbit Message; the copy sent; while the broker
    confirms it, the consumers cancelled (nowait) and the job offered to the
    process started beforehand; the confirm; the ack; the word go; the next
    process started (as ``Jobs.start`` calls ``warm_up``).
    """
    from rbit.message import Message
    from rbit.pybit import decode_build_request

    body = delivery.body.decode() if isinstance(delivery.body, bytes) else delivery.body
    message = Message(body=body, request=decode_build_request(body), queue=loop.queues[0])
    sent = time.perf_counter()
    _send_copy(loop.publisher, delivery, loop.queues[0], loop.in_progress)
    _cancel_nowait(loop.consumer)
    current, loop.waiting = loop.waiting, None
    current.offer(runner, message)
    _confirmed(loop.publisher)
    loop.confirms.append(time.perf_counter() - sent)
    delivery.ack()
    current.go()
    loop.waiting = loop.started()
    return current


def _release(loop):
    """The job has ended: ``queue.purge`` of the in-progress queue (nowait, on the copies' channel,
    before the next copy) and ``basic.consume`` of every queue again (nowait but the last)."""
    loop.publisher.queue_purge(loop.in_progress, nowait=True)
    loop.consumer.consume()


def _combined_loop(conn, loop, runner, count, deadline):
    """Jobs/s of *count* messages, each taken with the broker steps and run in a fresh process.

    *loop* holds the broker's side (see :func:`combined_floor`) and ``waiting``,
    the process started for the next job, replaced in it. Returns the rate and
    how many processes exited non-zero.
    """
    failed = 0
    first = last = None
    for _ in range(count):
        delivery = _next_delivery(conn, loop.pending, deadline, "combined floor")
        if first is None:
            first = time.perf_counter()
        failed += _run_to_exit(_take(loop, delivery, runner)) != 0
        _release(loop)
        last = time.perf_counter()
    return count / (last - first), failed


def _loop(conn, queues, in_progress, started):
    """The bare loop's state: the channels, the consumer and its deliveries, the queues, the
    process waiting for the next job, and the copies' confirm times."""
    channel, publisher, consumer, pending = _consuming(conn, queues)
    return types.SimpleNamespace(channel=channel, publisher=publisher, consumer=consumer, pending=pending,
                                 queues=queues, in_progress=in_progress, started=started, waiting=started(),
                                 confirms=[])


def _let_go(loop):
    _cancel_nowait(loop.consumer)
    if loop.waiting is not None:  # the one started for a next job that does not come
        loop.waiting.kill()
        _run_to_exit(loop.waiting)


def combined_floor(url, count, served=5, rounds=3, timeout=120.0):
    """Jobs/s of the promises' broker steps and a fresh process per job together, with no rbit loop.

    One bare loop does, per message, what rbit's promises ask of a worker of
    concurrency 1: on a channel of prefetch 1 (``basic.qos`` global) consuming
    *served* queues (the messages wait in the first), the message taken as
    rbit takes it (:func:`_take`: the copy published to the in-progress queue,
    the consumers cancelled and the job offered to the process started
    beforehand from rbit's fork server while the broker confirms the copy,
    the original's ``basic.ack``, the word go, the next process started); the job's
    process waited for as the worker waits (its result and its output's end, or
    the exit the fork server reports) and closed; ``queue.purge`` of the
    in-progress queue (nowait, on the copies' channel) and ``basic.consume`` of
    every queue again (nowait but the last). No job log, no status report, no PyBit.

    For a no-op python! and a shell!/bin/true job, in *rounds* rounds of
    ``count // rounds`` messages each, the two kinds taking turns, after
    :data:`WARM_UP` untimed messages of each; a round's rate is its messages
    over the time from its first delivery to its last ``consume_ok``. The
    floor is the fastest round; the rate over all rounds is given too.
    Returns ``{kind: {"rate": rate, "all": rate}}`` and the counts.
    """
    sys.path[:0] = [str(ROOT), str(BENCH)]
    from rbit.pybit import encode, make_request
    from rbit.runners import load

    runners = {kind: load(line, {}) for kind, line in PROCESS_RUNNERS.items()}
    started = _process_starter(runners.values())
    per_round = max(1, count // rounds)
    total = len(runners) * (WARM_UP + per_round * rounds)
    bodies = [encode(make_request(job_id, "hello", "1.0", "bench", "any", "x", "x")) for job_id in range(1, total + 1)]
    queues, in_progress = _preload(url, bodies, served, timeout)
    figures = {"n": per_round * rounds, "rounds": rounds, "queues": served, "failed": []}
    rates = {kind: [] for kind in runners}
    with Connection(url) as conn:
        loop = _loop(conn, queues, in_progress, started)
        deadline = time.monotonic() + timeout
        try:
            for kind, runner in runners.items():
                _combined_loop(conn, loop, runner, WARM_UP, deadline)
            for _ in range(rounds):
                for kind, runner in runners.items():
                    rate, failed = _combined_loop(conn, loop, runner, per_round, deadline)
                    rates[kind].append(rate)
                    if failed:
                        figures["failed"].append(f"{kind}: {failed} of {per_round} exited non-zero")
        finally:
            _let_go(loop)
    for kind, found in rates.items():
        figures[kind] = {"rate": max(found), "all": len(found) / sum(1 / rate for rate in found)}
    return figures


def pickup_floor(url, count, report_to, served=5, timeout=120.0):
    """The bare loop of :func:`combined_floor`, idle between messages: *count* messages that the
    benchmark publishes one at a time to the first of *served* queues, each run by
    ``python!runners:stamp``, which sends its start to *report_to* (``HOST:PORT``) as the
    worker's runner does; the pickup is the benchmark's to time.

    Prints ``ready`` on standard output once it consumes (the benchmark publishes then), and
    returns the confirm times of the copies (ms), the copy alone being most of a pickup.
    """
    sys.path[:0] = [str(ROOT), str(BENCH)]
    from rbit.runners import load

    runner = load("python!runners:stamp", {"report_to": report_to})
    started = _process_starter([runner])
    queues, in_progress = _preload(url, [], served, timeout)
    failed = 0
    with Connection(url) as conn:
        loop = _loop(conn, queues, in_progress, started)
        print("ready", file=sys.__stdout__, flush=True)
        deadline = time.monotonic() + timeout
        try:
            for _ in range(count):
                delivery = _next_delivery(conn, loop.pending, deadline, "pickup floor")
                failed += _run_to_exit(_take(loop, delivery, runner)) != 0
                _release(loop)
        finally:
            _let_go(loop)
    confirms = sorted(1000 * seconds for seconds in loop.confirms)
    return {"n": count, "queues": served, "failed": failed, "confirm_ms": confirms}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["process", "combined", "pickup"])
    parser.add_argument("count", type=int, help="jobs of each kind (and each way, for process), in 3 rounds; "
                                                "pickup: messages to take")
    parser.add_argument("--url", help="combined, pickup: the AMQP URL of a vhost of its own, e.g. "
                                      "amqp://guest:guest@127.0.0.1:5672/NAME")
    parser.add_argument("--served", type=int, default=5, help="combined, pickup: how many queues to consume "
                                                               "(default 5)")
    parser.add_argument("--report-to", help="pickup: HOST:PORT that the runner sends its stamps to")
    args = parser.parse_args(argv)
    if args.what in ("combined", "pickup") and not args.url:
        parser.error(f"{args.what} needs --url")
    if args.what == "pickup" and not args.report_to:
        parser.error("pickup needs --report-to")
    with contextlib.redirect_stdout(sys.stderr):
        if args.what == "process":
            figures = process_floor(args.count)
        elif args.what == "combined":
            figures = combined_floor(args.url, args.count, served=args.served)
        else:
            figures = pickup_floor(args.url, args.count, args.report_to, served=args.served)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
