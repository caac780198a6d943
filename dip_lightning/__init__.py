"""dip-lightning: a PyTorch Lightning experiment kit for DiP (pixel-space diffusion with a Patch Detailer Head)."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One version number, pyproject.toml's, read from the installed package's metadata.
    __version__ = version("dip-lightning")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
