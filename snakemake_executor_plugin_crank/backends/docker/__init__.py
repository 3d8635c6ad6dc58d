"""The Docker backend (backend.py says how the package is cut)."""

from .backend import DockerBackend
from .engine import DockerOptions

__all__ = ["DockerBackend", "DockerOptions"]
