"""A throw-away PostgreSQL cluster (Debian's package) on loopback: the state database of the
cluster tests and benchmarks. ``initdb`` makes it in a folder of its own, ``pg_ctl`` runs it on a
free port, TCP on 127.0.0.1 only and a Unix socket in that folder; nothing else on the machine
is touched. PostgreSQL refuses to run as root, so under root the cluster belongs to the
``postgres`` user that the package creates."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from radlens.demo.tools import free_port, system_tool

SUPERUSER = "radlens"


def postgres_bindir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: Debian keeps them out of PATH, one folder per
    major version (the newest wins)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    on_path = system_tool("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql "
                       "(make test does it)")


@dataclass
class ThrowawayPostgres:
    """One PostgreSQL cluster in ``folder``; ``start``, ``stop`` and ``restart`` may repeat."""

    folder: Path
    port: int = field(default_factory=free_port)
    started: bool = False

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(postgres_bindir() / tool), *args]
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout)[-2000:]}")
        return result

    def start(self) -> ThrowawayPostgres:
        if not self.data.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                owner = pwd.getpwnam("postgres")
                os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                      "-E", "UTF8", "--no-instructions")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"),
                  "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c max_connections=200", "start")
        self.started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
            self.started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url().replace("postgresql://", "postgresql+psycopg://"),
                                  isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def log(self) -> str:
        path = self.folder / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
