"""deploy/postgres-init.sql on a real PostgreSQL cluster, run the way the image runs it (psql
as the superuser `postgres`): the `mlflow` role it creates is no superuser, can reach only its
two databases, and is still enough for MLflow to build its tracking and basic-auth tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.stack import free_port
from tests.integration.test_team import PG_BIN, _as_postgres

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

INIT_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres-init.sql"
SUPER_PASSWORD = "superuser-password-for-tests"
MLFLOW_PASSWORD = "mlflow-role-password-for-tests"


@dataclass
class Cluster:
    port: int
    bin: Path
    root: Path

    def psql(
        self, user: str, password: str, database: str, sql: str
    ) -> subprocess.CompletedProcess[str]:
        """One statement over TCP (password authentication), without raising on failure."""
        cmd = [
            str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", user,
            "-d", database, "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql,
        ]  # fmt: skip
        env = {**os.environ, "PGPASSWORD": password}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg://mlflow:{MLFLOW_PASSWORD}@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A fresh cluster whose bootstrap superuser is `postgres`, initialised by postgres-init.sql
    over the local socket as the image's entry point does."""
    if not PG_BIN:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql")
    pg_bin = Path(PG_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="captchaops-pg-init-"))
    secret = root / "postgres_password"
    secret.write_text(MLFLOW_PASSWORD)
    pwfile = root / "pw"
    pwfile.write_text(SUPER_PASSWORD + "\n")
    if os.geteuid() == 0:
        for path in (root, secret, pwfile):
            shutil.chown(path, "postgres", "postgres")
    data, port = root / "data", free_port()
    initdb = [
        str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
        f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
    ]  # fmt: skip
    subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(root / "log")]
    subprocess.run(
        _as_postgres([*ctl, "-o", options, "-w", "start"]), check=True, capture_output=True
    )
    try:
        psql = [
            str(pg_bin / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres",
            "-d", "postgres", "--no-psqlrc", "-v", "ON_ERROR_STOP=1",
            "-v", f"mlflow_password_file={secret}", "-f", str(INIT_SQL),
        ]  # fmt: skip
        init = subprocess.run(_as_postgres(psql), capture_output=True, text=True, timeout=120)
        assert init.returncode == 0, init.stderr
        assert MLFLOW_PASSWORD not in init.stdout + init.stderr
        yield Cluster(port=port, bin=pg_bin, root=root)
    finally:
        subprocess.run(_as_postgres([*ctl, "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_the_mlflow_role_is_no_superuser(cluster: Cluster) -> None:
    row = cluster.psql(
        "postgres",
        SUPER_PASSWORD,
        "postgres",
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = 'mlflow'",
    )
    assert row.stdout.strip() == "f|f|f|f|f", row.stderr
    owners = cluster.psql(
        "postgres",
        SUPER_PASSWORD,
        "postgres",
        "SELECT datname FROM pg_database WHERE datdba = 'mlflow'::regrole ORDER BY datname",
    )
    assert owners.stdout.split() == ["mlflow", "mlflow_auth"]


def test_the_mlflow_role_reaches_only_its_databases(cluster: Cluster) -> None:
    for database in ("mlflow", "mlflow_auth"):
        made = cluster.psql("mlflow", MLFLOW_PASSWORD, database, "CREATE TABLE t (x int)")
        assert made.returncode == 0, made.stderr
    for sql in ("CREATE DATABASE other", "CREATE ROLE intruder", "ALTER ROLE mlflow SUPERUSER"):
        refused = cluster.psql("mlflow", MLFLOW_PASSWORD, "mlflow", sql)
        assert refused.returncode != 0, sql
        assert "permission denied" in refused.stderr or "must be superuser" in refused.stderr
    elsewhere = cluster.psql("mlflow", MLFLOW_PASSWORD, "postgres", "SELECT 1")
    assert elsewhere.returncode != 0 and "permission denied" in elsewhere.stderr
    wrong = cluster.psql("mlflow", "not-the-password", "mlflow", "SELECT 1")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr


def test_mlflow_builds_its_tables_as_that_role(cluster: Cluster, tmp_path: Path) -> None:
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(cluster.uri("mlflow"), str(tmp_path / "artifacts"))
    assert store.get_experiment("0").name == "Default"
    auth = AuthStore()
    auth.init_db(cluster.uri("mlflow_auth"))
    auth.create_user("someone", "a-password-of-twelve", is_admin=False)
    assert auth.authenticate_user("someone", "a-password-of-twelve")
    tables = cluster.psql(
        "mlflow",
        MLFLOW_PASSWORD,
        "mlflow",
        "SELECT count(*) FROM pg_tables WHERE tableowner = 'mlflow'",
    )
    assert int(tables.stdout.strip()) > 10
    store.engine.dispose()
    auth.engine.dispose()


def test_the_documented_restore_works_without_a_superuser_mlflow(
    cluster: Cluster, tmp_path: Path
) -> None:
    """docs/operations.md#restore: `postgres` recreates the databases, `mlflow` restores."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    before = SqlAlchemyStore(cluster.uri("mlflow"), str(tmp_path / "artifacts"))
    before.create_experiment("kept")
    before.engine.dispose()
    auth = AuthStore()
    auth.init_db(cluster.uri("mlflow_auth"))
    auth.create_user("restored", "a-password-of-twelve", is_admin=False)
    auth.engine.dispose()
    tcp = ["-h", "127.0.0.1", "-p", str(cluster.port)]
    local = ["-h", str(cluster.root), "-p", str(cluster.port)]
    env = {**os.environ, "PGPASSWORD": MLFLOW_PASSWORD}
    dumps = {}
    for db in ("mlflow", "mlflow_auth"):
        dump = subprocess.run(
            [str(cluster.bin / "pg_dump"), *tcp, "-U", "mlflow", "-Fc", db],
            env=env,
            capture_output=True,
            check=True,
        )
        dumps[db] = dump.stdout
    for db, data in dumps.items():
        for step in (
            ["dropdb", *local, "-U", "postgres", "--if-exists", db],
            ["createdb", *local, "-U", "postgres", "-O", "mlflow", db],
            [
                "psql", *local, "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
                "-c", f"REVOKE ALL ON DATABASE {db} FROM PUBLIC",
                "-c", "ALTER SCHEMA public OWNER TO mlflow",
                "-c", "REVOKE ALL ON SCHEMA public FROM PUBLIC",
            ],
        ):  # fmt: skip
            done = subprocess.run(
                _as_postgres([str(cluster.bin / step[0]), *step[1:]]),
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, (step, done.stderr)
        restore = [
            str(cluster.bin / "pg_restore"), *local, "-U", "mlflow", "-d", db,
            "--no-owner", "--exit-on-error",
        ]  # fmt: skip
        restored = subprocess.run(_as_postgres(restore), input=data, capture_output=True)
        assert restored.returncode == 0, restored.stderr.decode()
    after = SqlAlchemyStore(cluster.uri("mlflow"), str(tmp_path / "artifacts"))
    assert after.get_experiment_by_name("kept") is not None
    fresh = AuthStore()
    fresh.init_db(cluster.uri("mlflow_auth"))
    assert fresh.authenticate_user("restored", "a-password-of-twelve")
    owners = cluster.psql(
        "postgres",
        SUPER_PASSWORD,
        "postgres",
        "SELECT datname FROM pg_database WHERE datdba = 'mlflow'::regrole ORDER BY datname",
    )
    assert owners.stdout.split() == ["mlflow", "mlflow_auth"]
