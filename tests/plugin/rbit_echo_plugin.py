"""A third-party processor for rbit, as a plugin package ships it (the README's
"Processors from plugins").

``echo!TEXT`` appends one line ``TEXT JOB_ID QUEUE`` to the file named by the
runner section's ``output`` setting. It is registered in the ``rbit.processors``
entry-point group by ``rbit_echo_plugin-0.1.dist-info/entry_points.txt``, so
putting this folder on ``sys.path`` (or ``PYTHONPATH``) is all it takes for
:mod:`importlib.metadata` to find it: no ``pip install``.

``notarunner`` is registered too, on purpose pointing at a class that is not a
:class:`rbit.runners.Runner`, and ``broken`` at a module that does not exist:
rbit must refuse both when it reads the configuration.
"""

from rbit.errors import ConfigError
from rbit.runners import Runner


class EchoRunner(Runner):
    """``echo!TEXT``: writes TEXT and the job id to ``settings['output']``."""

    def __init__(self, spec, settings):
        super().__init__(spec, settings)
        if not self.settings.get("output"):
            raise ConfigError("echo! needs an 'output' setting naming the file to write")

    def run(self, message, set_status):
        with open(self.settings["output"], "a", encoding="utf-8") as handle:
            handle.write(f"{self.spec} {message.job_id} {message.queue}\n")


class NotARunner:
    """Looks like a runner, but does not subclass rbit.runners.Runner."""

    def __init__(self, spec, settings):
        self.spec = spec

    def run(self, message, set_status):
        raise AssertionError("a class that is not a Runner must never run")
