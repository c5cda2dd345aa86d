"""What tests and benchmarks share to run captchaops for real, so neither imports the other.

Not part of the installed package (nothing in `src/` imports it): pytest finds it through
`pythonpath = ["."]`, `python -m benchmarks` from the repository root through the working
directory.

`processes`: free ports, starting a service and waiting for its health, stopping it, RSS.
`mlflow_state`: put back the process-wide MLflow state a block of code changed.
`stack`: a whole private stack driven by the CLI, and the disk and registry tools the drills use.
`load`: open-loop HTTP load from a process of its own (`python -m harness.load`).
`attacks`, `attack_stack`: the hostile inputs of the attack suite and the stack they run on.
`training`: the tiny training config tests and smoke runs train with (seconds, not accuracy).
`hosts`: hosts made of network namespaces on one bridge, each with its own address (root).
"""
