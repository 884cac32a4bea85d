"""The local stack's PostgreSQL cluster (`secateur stack up --postgres`): one cluster per state dir, on loopback,
holding the `prefect` and `mlflow` databases of the stack's servers.

PostgreSQL refuses to run as root; there it runs as the `postgres` system user, its data under that user's
home (a root-owned state dir is usually not reachable by it), and `stack down` stops it with `pg_ctl stop`.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DATABASES = ("prefect", "mlflow")
ROLE = "secateur"
POSTGRES_BIN = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/lib/postgresql/16/bin"), Path("/usr/local/bin"))


class PostgresMissing(RuntimeError):
    pass


def _binary(name: str) -> str:
    for folder in POSTGRES_BIN:
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise PostgresMissing(f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql-15)")
    return found


@dataclass(frozen=True)
class Cluster:
    data: Path  # the cluster's data directory
    port: int
    user: str | None  # the system user it runs as (None: this process's user)

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{ROLE}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> Path:
        """The server's log, in its data directory (the one place the `postgres` user surely may write)."""
        return self.data / "server.log"

    def _run(self, *command: str) -> None:
        argv = ["runuser", "-u", self.user, "--", *command] if self.user else list(command)
        done = subprocess.run(argv, capture_output=True, text=True, cwd="/")
        if done.returncode:
            output = (done.stderr or done.stdout).strip()[-300:]
            raise RuntimeError(f"{Path(command[0]).name} failed: {output}; see {self.log}")

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """A new cluster: the `secateur` superuser, trusted on loopback only (a local stack, not a shared one)."""
        self.data.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.data, entry.pw_uid, entry.pw_gid)
        self.data.chmod(0o700)
        initdb = _binary("initdb")
        self._run(initdb, "-D", str(self.data), "-U", ROLE, "-E", "UTF8", "--auth=trust", "--no-instructions")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Its data, gone (the cluster must be stopped)."""
        shutil.rmtree(self.data, ignore_errors=True)

    def pid(self) -> int | None:
        """The postmaster's pid while the cluster runs (its first line of postmaster.pid)."""
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
        except (FileNotFoundError, IndexError, PermissionError):
            return None
        return int(first) if first.isdigit() else None

    def create_databases(self) -> None:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=ROLE, dbname="postgres")
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                for name in DATABASES:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()


def cluster_for(state_root: Path, port: int) -> Cluster:
    """The cluster of this state dir: under it, or (as root) under the `postgres` user's home."""
    if os.geteuid() != 0:
        return Cluster(state_root / "stack" / "postgres", port, None)
    try:
        home = Path(pwd.getpwnam("postgres").pw_dir)
    except KeyError as missing:
        raise PostgresMissing("running as root needs the `postgres` system user (apt-get install postgresql-15)") from (
            missing
        )
    key = hashlib.sha256(str(state_root).encode()).hexdigest()[:16]
    return Cluster(home / "secateur" / key, port, "postgres")
