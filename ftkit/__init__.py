"""ftkit: fine-tune small open LLMs on consumer GPUs, and prove the result beats the base model.

Importing ``ftkit`` is cheap on purpose: torch, transformers and friends are imported only inside
the functions that need them, so ``ftkit --help`` starts fast.
"""

from __future__ import annotations

import pluggy

from ftkit.errors import FtkitError
from ftkit.tasks import Example, Field, Task

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@ftkit.hookimpl def register_tasks(register): ...``
hookimpl = pluggy.HookimplMarker("ftkit")

__all__ = ["Example", "Field", "FtkitError", "Task", "__version__", "hookimpl"]
