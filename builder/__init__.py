"""builder: build a GPU-enabled Debian 13 worker qcow2 without Packer.

Public API::

    cfg = builder.load_config("images/cloud-gpu-worker.yaml", ["disk.size=40G"])
    builder.validate("images/cloud-gpu-worker.yaml")        # -> ImageConfig or ConfigError
    result = builder.build(cfg, on_event=callback)          # -> BuildResult

``on_event`` receives :class:`builder.events.Event` objects. Every failure is a :class:`BuilderError`
(see :mod:`builder.errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .config import ImageConfig, load_config
from .errors import BuilderError
from .events import Event

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
