"""The config: one set of dataclasses (`schema`), the single source of truth for every key."""
