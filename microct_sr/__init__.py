"""microct-sr: 8x super-resolution of bone micro-CT (R2-RCANGAN)."""

__version__ = "0.1.0"
