"""The live accuracy estimate: the estimator, the monitoring runs' names, what servers report.

`estimate` (ATC: a calibration per version and a sliding-window estimate, MLflow-free),
`monitoring` (names of the monitoring runs servers write and the gate reads), `reported` (what
the model servers' `/health` says, for `models`, `status` and the web app). It imports no
registry: the canary watch that acts on these numbers is `canary.watch`. The
server-side halves live in `serving/live_estimate.py` and `serving/monitoring_runs.py`.
"""
