"""tether's build backend: setuptools', plus mypy in the build environment when the
data path is to be compiled (``TETHER_COMPILE=1``, see setup.py), and only then: a pure
install does not fetch a type checker it does not use."""

from __future__ import annotations

import os
from typing import Any

from setuptools.build_meta import *  # noqa: F403  (the rest of the PEP 517 hooks)

_COMPILER = ["mypy>=1.8"]


def _compiling() -> bool:
    return os.environ.get("TETHER_COMPILE", "") in ("1", "true", "yes")


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    """mypy (mypyc) when compiling. (Not setuptools' own hook: it runs setup.py, which
    imports mypyc when compiling, before mypy is there; tether has no setup_requires.)"""
    return ["wheel", *(_COMPILER if _compiling() else [])]


def get_requires_for_build_editable(
        config_settings: dict[str, Any] | None = None) -> list[str]:
    """As `get_requires_for_build_wheel`."""
    return get_requires_for_build_wheel(config_settings)
