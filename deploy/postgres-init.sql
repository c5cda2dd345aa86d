-- Runs once, when the PostgreSQL volume is empty: basic-auth keeps its users and
-- permissions in a database of its own, beside MLflow's metadata (database `mlflow`).
CREATE DATABASE mlflow_auth OWNER mlflow;
