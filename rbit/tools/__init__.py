"""The tools behind ``rbit publish``, ``status``, ``try``, ``rejected``, ``recover``, ``logs``
and ``--check``.

Each is imported only when its command runs, so that starting the worker
never pays for them.
"""
