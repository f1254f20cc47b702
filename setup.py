"""setuptools entry point; metadata lives in pyproject.toml.

The optional ahead-of-time build of csrc/ hooks in here (see the csrc backend); a plain
``pip install -e .`` builds nothing.
"""

from setuptools import setup

setup()
