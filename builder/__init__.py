"""builder: build a GPU-enabled Debian 13 worker qcow2 without Packer."""

from .config import ImageConfig, load_config
from .errors import BuilderError

__all__ = ["BuilderError", "ImageConfig", "load_config"]
__version__ = "0.1.0"
