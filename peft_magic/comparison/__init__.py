"""Comparing methods and settings: `peft_magic.compare(...)` trains each variant and gathers one table."""

from .run import Comparison, compare, register_column

__all__ = ["Comparison", "compare", "register_column"]
