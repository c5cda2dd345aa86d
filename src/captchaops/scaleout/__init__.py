"""Work made of independent training runs (folds, trials, members) on Ray, locally or on a cluster.

`engine` starts or joins Ray, `work` is the unit of work (the MLflow-free loop in a Ray task),
`cv` and `tune` are the drivers that own the parent MLflow run. Only training commands import
this package: the model servers and the web app never load Ray.
"""

from captchaops.training import TrainError


class ScaleoutError(TrainError):
    """Ray or the tracking server cannot run the work (the message says how to fix it)."""
