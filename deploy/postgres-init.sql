-- compose.yaml's PostgreSQL: the `prefect` database is POSTGRES_DB; MLflow gets its own (both use alembic_version).
CREATE DATABASE mlflow OWNER secateur;
