"""hessc.bench: the model zoo and the commands that measure hessc against its peers.

- ``zoo``: real models with calibration and evaluation data, all from packages (MODELS.md);
- ``compare``: ``hessc bench``, every method at every setting, results as JSON and markdown;
- ``sensitivity``: which curvature estimate predicts measured per-layer loss changes;
- ``demo``: ``hessc demo``, MiniLM through ``optimize`` for the CPU, before and after;
- ``digests``: digests of ``optimize`` outputs on the zoo, for before/after comparisons.

Nothing here is imported by ``import hessc``: these modules load torch and the model packages.
"""
