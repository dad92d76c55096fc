"""Analyses of the paper, each a thin shell over the numerical core in :mod:`lexp.redundancy`.

An analysis module has ``run(ctx, heads)`` and optionally ``prepare(ctx) -> {name: columns}``:
heads returned by ``prepare`` are trained in the same pass over the data as the oracle.
"""
