#!/usr/bin/env python
"""Build (or reuse from the cache) the zoo and optionally print the 4a-4c fairness table.

    python scripts/build_zoo.py                     # the default zoo (dense + MoE pairs)
    python scripts/build_zoo.py --config tiny       # the seconds-long test variant
    python scripts/build_zoo.py --table --overhead  # + uniform-merge table (lm-eval) and evaluate_model overhead
    python scripts/build_zoo.py base.steps=800      # any ZooConfig field, dotted

Same as ``python -m darwin_hydra.zoo``.
"""

from darwin_hydra.zoo.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
