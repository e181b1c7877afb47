"""Analysis on captured arrays: directions, probes, statistics, fluency, steering scores."""
