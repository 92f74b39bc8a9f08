"""Size arithmetic used across the package: rounding a count up to a multiple (bucketed lengths,
padded vocabularies, slot counts), ceiling division and the rung of a ladder of shapes. Works on Python ints
and numpy integer arrays."""
from __future__ import annotations


def ceil_div(n, d):
    """``ceil(n / d)`` for non-negative integers (or integer arrays) without floating point."""
    return -(-n // d)


def round_up(n, multiple):
    """The smallest multiple of ``multiple`` that is ``>= n`` (``n`` itself when it already is one)."""
    return ceil_div(n, multiple) * multiple


def rung(ladder, n: int):
    """The first value of an ascending ``ladder`` that is ``>= n`` (a bucketed shape), None past its top."""
    return next((b for b in ladder if n <= b), None)
