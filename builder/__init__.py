"""builder: build a GPU-enabled Debian 13 worker qcow2 without Packer.

Public API::

    cfg = builder.load_config("images/cloud-gpu-worker.yaml", ["disk.size=40G"])
    builder.validate("images/cloud-gpu-worker.yaml")        # -> ImageConfig or ConfigError
    result = builder.build(cfg, on_event=callback)          # -> BuildResult

``on_event`` receives :class:`builder.events.Event` objects. Every failure is a :class:`BuilderError`
(see :mod:`builder.errors`).
"""

from __future__ import annotations

# First thing, before the imports below (pydantic and yaml take ~0.1 s): under ``python -m builder`` a Ctrl-C
# from here until builder.__main__ hands over to the CLI is one line and exit 130, not a traceback from the
# middle of an import. A program that merely imports builder keeps its own SIGINT handling. (_signal, sys and os
# are loaded at interpreter start; the signal module itself takes milliseconds to import.)
import _signal  # type: ignore[import-not-found]
import os as _os
import sys as _sys


def _interrupted_early(signum: int, frame: object) -> None:
    try:
        _os.write(2, b"interrupted\n")
    finally:
        _os._exit(130)


def _started_as_main() -> bool:
    """True while ``python -m builder`` imports this package (runpy sets sys.argv[0] to "-m" until then)."""
    argv, orig = _sys.argv, getattr(_sys, "orig_argv", [])
    if argv[:1] != ["-m"] or len(orig) <= len(argv):
        return False
    token = orig[-len(argv)]  # the module name after -m (or "-mbuilder" as one argument)
    return token == "builder" or (token.startswith("-") and not token.startswith("--") and token.endswith("mbuilder"))


if _started_as_main() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_early)

from typing import TYPE_CHECKING, Any  # noqa: E402

from . import errors  # noqa: E402
from .config import ImageConfig, load_config  # noqa: E402
from .errors import BuilderError  # noqa: E402
from .events import Event  # noqa: E402

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .pipeline import BuildResult, build


def validate(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ImageConfig:
    """Load and validate an image definition (raises ConfigError listing every problem)."""
    return load_config(path, overrides)


def __getattr__(name: str) -> Any:  # the pipeline pulls in QEMU/SSH/Ansible code: import it on first use
    if name in ("build", "BuildResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'builder' has no attribute {name!r}")


__all__ = ["BuildResult", "BuilderError", "Event", "ImageConfig", "build", "errors", "load_config", "validate"]
