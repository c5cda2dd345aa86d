"""The registry: the only writer of registry state (models, versions, aliases, tags, audit runs).

Modules: `names` (aliases, scheme names, actors), `errors` (one-line errors), `versions`
(registered models, version creation, the frozen set's pin), `rest_writes` (the same over REST,
for account admin), `audit` (the audit trail), `lock` (the cross-process promotion lock),
`aliases` (reading aliases, the one audited move and the audited removal), `signing` (the
signed record of a move), `unaudited` (the moves servers may trust), `requests` (production
requests waiting for approval) and `listing` (the `models` table). Library functions take an
explicit `MlflowClient` (from `mlflow_scope.client(settings)`); the ones that take `Settings`
make their own and turn tracking failures into one-line `RegistryError`s.

The bottom layer of the registry side (docs/layout.md): it stores what others decide and
imports neither `evaluation` nor `decisions`; promotion, rollback, canaries and the score
cache live in `captchaops.decisions`.

The package defines no names: callers import the module that defines one
(`from captchaops.registry.aliases import resolve_alias`), so a model server that imports
`registry.signing` loads no MLflow, and readers and type checkers follow ordinary imports.
"""
