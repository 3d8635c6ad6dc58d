"""The Docker backend (backend.py says how the package is cut)."""

from .backend import DockerBackend
from .engine import DockerOptions, Hints

__all__ = ["DockerBackend", "DockerOptions", "Hints"]
