"""The decisions: which version holds which alias, judged above the registry and the evaluation.

`gate_rules` (the thresholds and the rules, MLflow-free), `gate` (the continuous-deployment gate
and training's staging floor), `scores` (the score cache kept in version tags), `promotion`
(promote, rollback and the staging move) and `approval` (production moves that wait for a
second account). The canary's registry side sits in this layer from its own folder
(`canary.moves`, `canary.watch`). They read through `evaluation` and `registry` and write only
through `registry`; nothing below imports them (docs/layout.md, tests/unit/test_imports.py).
"""
