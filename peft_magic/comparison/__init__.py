"""Comparing methods and settings: `peft_magic.compare(...)` trains each variant and gathers one table."""

from .result import Comparison
from .run import compare, register_column

__all__ = ["Comparison", "compare", "register_column"]
