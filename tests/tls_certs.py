"""Throw-away certificates for the TLS tests, made with the ``openssl`` command line.

:func:`make_certs` writes, into one directory:

- a CA (``ca.crt``) that signs everything below;
- a server certificate for ``localhost`` *and* ``127.0.0.1`` (``server.crt``);
- a server certificate for ``localhost`` only, with no IP address in it
  (``localhost.crt``), to show that the host name is checked;
- a client certificate, ``CN=rbit-client`` (``client.crt``);
- a second CA that signed none of them (``other-ca.crt``).

Keys are unencrypted PEM (PKCS#8), readable by their owner: the private
RabbitMQ nodes of tests/rabbit_node.py run as the user running the tests.
Nothing is read from the system's ``openssl.cnf``: the configuration is ours.
A missing ``openssl`` FAILS the test (never skips it).
"""

import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Days the certificates are valid (the tests last minutes).
DAYS = "2"

#: Our own openssl configuration: ``req`` needs one, and the system's may differ or be missing.
OPENSSL_CNF = """\
[ req ]
distinguished_name = dn
prompt = no

[ dn ]
CN = unused

[ ca ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ server ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost, IP:127.0.0.1

[ localhost_only ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost

[ client ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Certs:
    """Paths of the files :func:`make_certs` wrote."""

    dir: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    localhost_cert: Path
    localhost_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_ca_key: Path

    #: The client certificate's subject, as RabbitMQ shows it.
    client_cn = "rbit-client"


def openssl_path():
    """The ``openssl`` program; the test FAILS (never skips) without it."""
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the openssl command line is not installed: the TLS tests need it to make certificates")
    return path


def _run(directory, *args):
    result = subprocess.run(
        [openssl_path(), *args], cwd=str(directory), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env={**os.environ, "OPENSSL_CONF": str(Path(directory) / "openssl.cnf")},
    )
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def _key(directory, name):
    path = Path(directory) / f"{name}.key"
    _run(directory, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path))
    path.chmod(0o600)
    return path


def _ca(directory, name, cn):
    key = _key(directory, name)
    cert = Path(directory) / f"{name}.crt"
    _run(directory, "req", "-config", "openssl.cnf", "-new", "-x509", "-key", str(key), "-out", str(cert),
         "-days", DAYS, "-subj", f"/O=rbit tests/CN={cn}", "-extensions", "ca",
         "-set_serial", str(secrets.randbits(63)))
    return cert, key


def _signed(directory, name, cn, extensions, ca_cert, ca_key):
    key = _key(directory, name)
    csr = Path(directory) / f"{name}.csr"
    cert = Path(directory) / f"{name}.crt"
    _run(directory, "req", "-config", "openssl.cnf", "-new", "-key", str(key), "-out", str(csr),
         "-subj", f"/O=rbit tests/CN={cn}")
    _run(directory, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-set_serial", str(secrets.randbits(63)), "-days", DAYS, "-out", str(cert),
         "-extfile", "openssl.cnf", "-extensions", extensions)
    csr.unlink()
    return cert, key


def make_certs(directory):
    """Write the CAs, server and client certificates into *directory*; a :class:`Certs`."""
    directory = Path(directory)
    (directory / "openssl.cnf").write_text(OPENSSL_CNF)
    ca, ca_key = _ca(directory, "ca", "rbit test CA")
    server_cert, server_key = _signed(directory, "server", "localhost", "server", ca, ca_key)
    localhost_cert, localhost_key = _signed(directory, "localhost", "localhost", "localhost_only", ca, ca_key)
    client_cert, client_key = _signed(directory, "client", Certs.client_cn, "client", ca, ca_key)
    other_ca, other_ca_key = _ca(directory, "other-ca", "rbit unrelated CA")
    return Certs(directory, ca, ca_key, server_cert, server_key, localhost_cert, localhost_key,
                 client_cert, client_key, other_ca, other_ca_key)


class TempCerts:
    """``with TempCerts() as certs``: :func:`make_certs` in a temporary directory, removed after."""

    def __enter__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="rbit-tls-"))
        try:
            return make_certs(self.dir)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)
