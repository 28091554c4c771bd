-- The team service's three databases, created once by the postgres image on first start
-- (/docker-entrypoint-initdb.d runs *.sql as POSTGRES_USER, who owns them):
--   mlflow       MLflow tracking + model registry (--backend-store-uri)
--   mlflow_auth  MLflow basic-auth users and permissions (basic_auth.ini database_uri)
--   optuna       the shared Optuna studies (ltexp tune --storage)
-- Names use underscores, not hyphens, so they need no quoting in SQL or URLs.
-- Natively: psql -h HOST -U USER -d postgres -f deploy/init-databases.sql
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
