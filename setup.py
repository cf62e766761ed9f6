"""Packaging for rbit."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "rbit" / "__init__.py").read_text()).group(1)

setup(
    name="rbit",
    version=VERSION,
    description="A build worker for PyBit: takes build requests off RabbitMQ and runs them",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="LGPL-2.1",
    packages=find_packages(include=["rbit", "rbit.*", "rbitext", "rbitext.*"]),
    # The live page (rbit.web) is served from these files: no build step, nothing from elsewhere.
    package_data={"rbit": ["static/*.html", "static/*.js", "static/*.css"]},
    python_requires=">=3.10",
    install_requires=[
        "kombu>=5.3",
        "click>=8.0",
        "python-daemon>=3.0",
        "jsonpickle>=3.0",
        # HTTP status reports to PyBit: retries, auth and connection pooling we need not write.
        "requests>=2.28",
        # /metrics in Prometheus's format, with its histogram and exposition rules.
        "prometheus-client>=0.16",
    ],
    extras_require={
        # playwright drives Debian's chromium in the live page's tests (never a browser it downloads).
        "test": ["pytest>=7", "hypothesis>=6", "playwright>=1.40"],
    },
    entry_points={
        "console_scripts": ["rbit = rbit.cli:main"],
    },
    classifiers=[
        "License :: OSI Approved :: GNU Lesser General Public License v2 (LGPLv2)",
        "Programming Language :: Python :: 3",
        "Topic :: Software Development :: Build Tools",
    ],
)
