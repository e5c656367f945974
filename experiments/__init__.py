"""Experiment modules: `python -m experiments.NAME --workdir DIR [--config.KEY=VALUE ...]`."""
