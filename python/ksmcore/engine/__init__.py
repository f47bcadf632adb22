"""The engine: a Python machine model whose ksmd runs in the C core."""

from .machine import Machine
from .process import Process

__all__ = ["Machine", "Process"]
