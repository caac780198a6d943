"""dip-lightning: a PyTorch Lightning experiment kit for DiP (pixel-space diffusion with a Patch Detailer Head)."""

__version__ = "0.1.0"
