"""llmctl: from private domain text to a private, served language model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmctl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
