"""Inference."""

from .sample import generate_simple

__all__ = ["generate_simple"]
