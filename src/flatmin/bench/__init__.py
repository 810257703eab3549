"""Benchmarks as commands: ``flatmin bench --preset demo`` and the other presets and modes.

:mod:`flatmin.bench.command` dispatches to one module per benchmark; each prints its
table and writes its files, and says which command produced them.
"""
