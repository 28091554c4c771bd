#!/usr/bin/env python3
"""Add an MLflow user (if missing) and grant it a permission on an experiment (created if missing).

Uses only the tracking server's auth REST API, with the admin login from the environment:

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
    NEW_USER_PASSWORD=... python deploy/add-user.py alice --experiment ltexp --model ltexp-digits --permission EDIT

Permissions: READ (see), USE, EDIT (log runs, register models), MANAGE (also delete and grant),
NO_PERMISSIONS. docker-compose.yml runs it once (service `users`) for the workers' login.
Standard library only, so it runs in the MLflow image as it is.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def call(method: str, path: str, body: dict | None = None, params: dict | None = None) -> tuple[int, dict]:
    """One authenticated REST call; returns (HTTP status, JSON body)."""
    url = os.environ["MLFLOW_TRACKING_URI"].rstrip("/") + "/api/" + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    login = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": "Basic " + base64.b64encode(login.encode()).decode(),
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"message": text[:300]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("username")
    parser.add_argument("--experiment", help="experiment name to grant on (created when missing)")
    parser.add_argument("--model", action="append", default=[],
                        help="registered model name to grant on as well (repeatable; it may not exist yet)")
    parser.add_argument("--permission", default="EDIT", help="READ, USE, EDIT, MANAGE or NO_PERMISSIONS (default EDIT)")
    parser.add_argument("--password-env", default="NEW_USER_PASSWORD",
                        help="environment variable holding the new user's password (default NEW_USER_PASSWORD)")
    args = parser.parse_args(argv)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if not os.environ.get(name):
            print(f"add-user: error: {name} is not set (the admin login)", file=sys.stderr)
            return 2

    status, _ = call("GET", "2.0/mlflow/users/get", params={"username": args.username})
    if status == 200:
        print(f"user {args.username} exists")
    else:
        password = os.environ.get(args.password_env, "")
        status, body = call("POST", "2.0/mlflow/users/create", {"username": args.username, "password": password})
        if status != 200:
            print(f"add-user: error: cannot create user {args.username!r}: HTTP {status} "
                  f"{body.get('message', body)}", file=sys.stderr)
            return 1
        print(f"created user {args.username}")

    if args.experiment:
        status, body = call("GET", "2.0/mlflow/experiments/get-by-name", params={"experiment_name": args.experiment})
        if status == 200:
            experiment_id = body["experiment"]["experiment_id"]
        else:
            status, body = call("POST", "2.0/mlflow/experiments/create", {"name": args.experiment})
            if status != 200:
                print(f"add-user: error: cannot create experiment {args.experiment!r}: HTTP {status} "
                      f"{body.get('message', body)}", file=sys.stderr)
                return 1
            experiment_id = body["experiment_id"]
        if not grant(args, "experiment", experiment_id, f"experiment {args.experiment} ({experiment_id})"):
            return 1
    for model in args.model:
        if not grant(args, "registered_model", model, f"registered model {model}"):
            return 1
    return 0


def grant(args, resource_type: str, resource_id: str, label: str) -> bool:
    """Grant `args.permission` on one experiment or registered model; print the outcome."""
    status, body = call("POST", "3.0/mlflow/users/permissions/grant",
                        {"username": args.username, "resource_type": resource_type, "resource_id": resource_id,
                         "permission": args.permission})
    if status != 200:
        print(f"add-user: error: cannot grant {args.permission} on {label}: HTTP {status} "
              f"{body.get('message', body)}", file=sys.stderr)
        return False
    print(f"granted {args.permission} on {label} to {args.username}")
    return True


if __name__ == "__main__":
    sys.exit(main())
