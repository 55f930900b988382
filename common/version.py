"""The installed pdserve's version, as its distribution metadata says (the one place it is written is
pyproject.toml)."""

from __future__ import annotations

from importlib.metadata import version

VERSION = version("pdserve")
