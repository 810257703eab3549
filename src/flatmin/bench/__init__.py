"""Benchmarks: the demo preset, speed, accuracy studies and the SAF paper's figures.

Each benchmark is a module of functions that train, time or measure and write their
files; ``flatmin bench`` (:mod:`flatmin.cli.bench`) parses the options and prints the
results, and says which command produced them.
"""
