"""Embedded demo: procedural captioned shapes, tiny text encoder, shipped weights."""
