-- Run once by the postgres image on an empty data directory: MLflow's auth app keeps its users in a
-- database of its own (the tracking store is POSTGRES_DB=mlflow).
CREATE DATABASE mlflow_auth;
