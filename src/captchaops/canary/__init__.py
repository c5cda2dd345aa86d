"""The canary, in one place: a candidate gets a share of production's traffic under `@canary`
until its breaker trips, its watch passes, or someone ends it.

Its registry side and its server side sit side by side, each in the layer of what it works
with (docs/layout.md, tests/unit/test_imports.py `FEATURES`):

- registry side, in the decisions layer: `moves` (start and end a canary: audited alias moves
  and the `canary_percent` tag) and `watch` (`promote --canary`'s watch of the production
  server's breaker, which writes its verdict down through `moves` and `decisions.approval`);
- server side, in the serving layer: `slot` (production's second slot, which follows `@canary`
  and routes its share) and `breaker` (when the slot stops routing; pure logic). The server
  side imports nothing of the registry side, so a model server stays MLflow-free.

The options live on `promote --canary` and `rollback --canary` (`cli/canary.py`).
"""
