"""Pipeline stages, one module each: scan, prescribe, search, merge (export), health, report.

Each stage is a small ``darwin_hydra.pipeline.Stage`` built from ``pipeline.registry`` by
``_target_``; it glues the pure functions of its package to config, files and tracking.
"""
