"""llava_fast: fast, correct kernels, model and training loop for the LLaVA family.

Importing the package touches no GPU and needs no compiled extension; see :func:`env` for what is usable here.
"""
__version__ = "0.1.0"

from llava_fast import _ext  # noqa: E402
from llava_fast.backend import get_backend, set_backend  # noqa: E402
from llava_fast.envinfo import env  # noqa: E402

_ext.warn_removed_switches()

_LAZY = {
    "from_pretrained": "llava_fast.models",
    "LlavaForConditionalGeneration": "llava_fast.models",
    "LlavaNextForConditionalGeneration": "llava_fast.models",
    "LlavaOnevisionForConditionalGeneration": "llava_fast.models",
    "LlavaConfig": "llava_fast.models",
    "patch_hf": "llava_fast.patching",
    "unpatch_hf": "llava_fast.patching",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llava_fast' has no attribute {name!r}")


__all__ = ["__version__", "env", "set_backend", "get_backend", *_LAZY]
