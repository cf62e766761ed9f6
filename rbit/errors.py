"""All of rbit's exceptions, under one base class."""


class RbitError(Exception):
    """Base class of every error rbit raises on purpose."""


class ConfigError(RbitError):
    """The configuration file is wrong; the message names file, section and key."""

    def __init__(self, message, path=None, section=None, key=None):
        self.path = path
        self.section = section
        self.key = key
        self.reason = message
        where = ", ".join(
            part
            for part in (
                str(path) if path else None,
                f"section [{section}]" if section else None,
                f"key {key!r}" if key else None,
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class BadMessage(RbitError):
    """A message body that is not a valid PyBit request; never handed to a runner."""

    def __init__(self, reason):
        self.reason = reason
        super().__init__(reason)


class UnknownStatus(RbitError, ValueError):
    """A runner reported a status that PyBit does not know."""


class BrokerError(RbitError):
    """The broker refused or lost something rbit cannot go on without."""


class ConnectionLost(BrokerError):
    """The connection or channel to the broker failed; connecting again cures it."""


class QueueUnavailable(ConnectionLost):
    """A durable classic queue whose node is down: it is back when that node is."""


class QueueMissing(BrokerError):
    """A queue that was looked for does not exist."""


class QueueLocked(BrokerError):
    """An exclusive queue is held by another connection."""


class QueueMismatch(BrokerError):
    """A queue exists with other flags or arguments than rbit declares (PRECONDITION_FAILED)."""


class Unroutable(BrokerError):
    """The broker returned a mandatory message: no queue is bound to its routing key."""


class NameInUse(BrokerError):
    """Another worker with the same name is connected to the broker."""


class NoLog(RbitError):
    """A job's log is neither in the log directory nor at a running worker."""


# -- The runner author's words for an outcome -------------------------------


class JobOutcome(RbitError):
    """Raised by a runner to end its job with a given status."""

    #: The PyBit status this outcome is reported as.
    status = None

    def __init__(self, message=None):
        self.message = message
        super().__init__(*([message] if message is not None else []))


class Blocked(JobOutcome):
    """The job cannot run yet (missing build dependencies, say): offered again later."""

    status = "Blocked"


class Failed(JobOutcome):
    """The job failed; the message is reported with the ``Failed`` status."""

    status = "Failed"
