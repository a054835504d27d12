"""Shared test set-up: import this repository as the package ComfyUI would load.

ComfyUI imports a custom-node folder as a package from its ``__init__.py``; we do the same under
the name ``comfyui_memkit`` so tests import ``comfyui_memkit.model_cache`` etc. whatever the
checkout's folder is called.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_memkit"


def _import_package() -> None:
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


_import_package()


sys.path.insert(0, str(REPO / "tests"))  # shared helpers: `from support import ...`
