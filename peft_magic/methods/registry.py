"""Where the method modules register themselves (name -> `Method`); `methods.get_method` looks them up, loading
the modules on first use. Its own module so that a method module never imports the package that imports it."""

from __future__ import annotations

METHODS: dict = {}


def register(name: str, method) -> None:
    METHODS[name] = method
