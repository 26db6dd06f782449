"""Every sidecar module imports on its own, first (no import cycle hides behind the order others load in)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import sidecar

MODULES = sorted(m.name for m in pkgutil.walk_packages(sidecar.__path__, "sidecar.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_first(name: str) -> None:
    saved = {k: v for k, v in sys.modules.items() if k == "sidecar" or k.startswith("sidecar.")}
    for k in saved:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    finally:
        for k in [k for k in sys.modules if k == "sidecar" or k.startswith("sidecar.")]:
            del sys.modules[k]
        sys.modules.update(saved)
