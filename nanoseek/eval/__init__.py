"""Evaluation."""

from .fim import FimResult, fim_exact_match, make_fim_cases

__all__ = ["FimResult", "fim_exact_match", "make_fim_cases"]
