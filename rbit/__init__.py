"""rbit: a build worker for PyBit that takes build requests off RabbitMQ and runs them."""

from .errors import Blocked, Failed, RbitError, UnknownStatus
from .message import Message
from .statuses import ALL as STATUSES

__version__ = "0.1.0"

__all__ = ["Blocked", "Failed", "Message", "RbitError", "STATUSES", "UnknownStatus", "__version__"]
