"""Fault tests: single scenarios (test_*.py) and the randomized suite (randomized/)."""
