"""Where PyBit's web front end is, and how rbit speaks to it: job URLs, credentials, safe logs."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from .config import PybitSettings


def job_url(pybit: PybitSettings | None, web_host: str | None, job_id) -> str:
    """PyBit's URL of one job: ``{pybit.url}/job/{id}``, or on the request's ``web_host``.

    The configuration allows ``web_host`` only when no credentials are set, so
    a password never goes to a host that a message names.
    """
    if pybit is not None and pybit.url:
        base = pybit.url.rstrip("/")
    else:
        base = f"http://{web_host}"
    return f"{base}/job/{job_id}"


def auth(pybit: PybitSettings) -> tuple[str, str] | None:
    """The basic-auth credentials for PyBit, if configured."""
    if not pybit.user:
        return None
    return (pybit.user, pybit.password or "")


def safe_url(url: str) -> str:
    """*url* without any password written into it, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc))


def redact(pybit: PybitSettings, error: BaseException) -> str:
    """The text of *error* (urllib3's own reason when wrapped), never the PyBit password."""
    inner = error.args[0] if error.args else None
    text = str(getattr(inner, "reason", None) or error)
    password = getattr(pybit, "password", None)
    if password and password in text:
        # Masking the password in place would show where its characters are.
        return f"{type(error).__name__} (details withheld: they contain the PyBit password)"
    return text
