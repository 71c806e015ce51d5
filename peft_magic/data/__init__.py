"""Data: sources, rows, tokenizing, the tokenized-split cache, and the built-in general text."""
