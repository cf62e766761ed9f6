"""PyBit's wire format: reading build requests safely and writing them as PyBit does.

``models`` holds rbit's view of PyBit's classes, ``schema`` the shape of each
on the wire, ``reading`` the strict decoder (jsonpickle's decoder is never
called on a message), ``writing`` the encoder.
"""

from .models import (
    Arch, BuildD, BuildEnv, BuildRequest, CancelRequest, Dist, Format, Job, Package, PackageInstance,
    Suite, Transport,
)
from .reading import decode, decode_build_request, decode_cancel_request
from .schema import MAX_BODY_BYTES, MAX_DEPTH, MAX_STRING_LENGTH, OBJECT_TAG, PYBIT_MODULE
from .writing import encode, make_request

__all__ = [
    "Arch", "BuildD", "BuildEnv", "BuildRequest", "CancelRequest", "Dist", "Format", "Job", "Package",
    "PackageInstance", "Suite", "Transport", "decode", "decode_build_request", "decode_cancel_request",
    "encode", "make_request", "MAX_BODY_BYTES", "MAX_DEPTH", "MAX_STRING_LENGTH", "OBJECT_TAG", "PYBIT_MODULE",
]
