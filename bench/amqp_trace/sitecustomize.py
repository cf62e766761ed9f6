"""Counts the AMQP methods a process sends (bench/bench.py, "broker round trips per job").

The benchmark puts this directory first on ``PYTHONPATH`` of one worker run,
with ``RBIT_BENCH_AMQP_TRACE=PATH``. Python imports ``sitecustomize`` at
start-up, so py-amqp's ``AbstractChannel.send_method`` and ``wait`` are wrapped
before rbit makes its connection. Each method sent is appended to PATH as
``PID TIME send NAME``, and each blocking wait for the broker's reply as
``PID TIME wait NAME`` (a round trip). rbit itself is not changed.
"""

import os

_PATH = os.environ.get("RBIT_BENCH_AMQP_TRACE")


def _install(path):
    import functools
    import time

    from amqp import abstract_channel, spec

    names = {}
    for cls in (spec.Connection, spec.Channel, spec.Exchange, spec.Queue, spec.Basic, spec.Confirm, spec.Tx):
        for attr, value in vars(cls).items():
            if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
                names[value] = f"{cls.__name__.lower()}.{attr[0].lower()}{attr[1:]}".replace("Ok", "_ok")
    out = open(path, "a", buffering=1)  # noqa: SIM115 - written until the traced worker exits
    pid = os.getpid()

    def name_of(sig):
        if isinstance(sig, (list, tuple)) and sig and isinstance(sig[0], (list, tuple)):
            return "|".join(name_of(s) for s in sig)
        return names.get(tuple(sig), str(sig))

    send_method = abstract_channel.AbstractChannel.send_method
    wait = abstract_channel.AbstractChannel.wait

    @functools.wraps(send_method)
    def send_method_traced(self, sig, *args, **kwargs):
        if os.getpid() == pid:
            out.write(f"{pid} {time.time()!r} send {name_of(sig)}\n")
        return send_method(self, sig, *args, **kwargs)

    @functools.wraps(wait)
    def wait_traced(self, method, *args, **kwargs):
        if os.getpid() == pid:
            out.write(f"{pid} {time.time()!r} wait {name_of(method)}\n")
        return wait(self, method, *args, **kwargs)

    abstract_channel.AbstractChannel.send_method = send_method_traced
    abstract_channel.AbstractChannel.wait = wait_traced


if _PATH:
    try:
        _install(_PATH)
    except ImportError:  # a process without py-amqp (the fork server's helpers, /bin/sh, ...)
        pass
