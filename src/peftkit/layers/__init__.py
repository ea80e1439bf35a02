"""Adapter layer base classes shared by every method."""

from .base import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper

__all__ = ["AdapterLayer", "ModulesToSaveWrapper"]
