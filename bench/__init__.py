"""Benchmarks. Every script here times the dynamic tree's probe afresh in each process, as all runs
before the probe's disk cache did (so results stay comparable, and the variation between processes
that ``autotree_stability.py`` measures stays visible): ``EAGLE_AUTOTREE_CACHE`` defaults to 0 here
(set it to 1 to use the saved timings)."""

import os

os.environ.setdefault("EAGLE_AUTOTREE_CACHE", "0")
