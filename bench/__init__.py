"""`make bench`: speed and memory ratios on the embedded model (bench/run.py)."""
