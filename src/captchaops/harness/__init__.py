"""What tests and benchmarks share to run captchaops for real, so neither imports the other.

`processes`: free ports, starting a service and waiting for its health, stopping it, RSS.
`mlflow_state`: put back the process-wide MLflow state a block of code changed.
`stack`: a whole private stack driven by the CLI, and the disk and registry tools the drills use.
`load`: open-loop HTTP load from a process of its own (`python -m captchaops.harness.load`).
"""
