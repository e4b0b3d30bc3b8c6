"""Cache -> Optuna + ASHA on Ray Tune -> SAEs: the checks before Ray, the driver, how a layer
reaches the trials, the trial itself, the probe metric, the console and the MLflow callback."""
