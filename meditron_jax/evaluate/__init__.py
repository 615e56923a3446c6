"""Benchmark evaluation (``meditron-eval``) and benchmark -> SFT data (``meditron-prepare-sft``).

loaders.py (one loader per published file format -> Item), prompts.py (the prompt table),
scoring.py (pure scoring functions), batching.py (packed forward passes), runner.py (one seed of
one benchmark), cli.py (the command), to_sft.py (the SFT converter).
"""
