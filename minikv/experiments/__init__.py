"""Experiment scripts that produced the numbers in RESULTS.md (run as `python -m minikv.experiments.NAME`).

They write JSON/markdown/PNG under results/ (git-ignored); RESULTS.md quotes their tables with the commands.
"""
