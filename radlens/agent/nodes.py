"""The nodes sharing one state: each serving process registers with its role, host and pid, and
beats a heartbeat into the state database, so ``radlens status`` shows who is alive and what a
dead node left behind."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from radlens.db import Database, nodes
from radlens.logs import kv

log = logging.getLogger(__name__)

ROLES = ("all", "listener", "worker", "sender")
MISSED_BEATS = 3  # a node that has not beaten for this many intervals counts as silent


def heard_since(now: float, heartbeat_interval_s: float) -> float:
    """The oldest heartbeat of a node still counted alive at ``now``."""
    return now - MISSED_BEATS * heartbeat_interval_s


@dataclass
class Node:
    """This process as a node of the state it opened."""

    db: Database
    role: str
    id: str = ""

    def register(self) -> Node:
        now = time.time()
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with self.db.transaction() as conn:
            conn.execute(sa.insert(nodes).values(id=self.id, role=self.role,
                                                 host=socket.gethostname(), pid=os.getpid(),
                                                 started_at=now, heartbeat_at=now))
        log.info("node registered", extra=kv(node=self.id, role=self.role))
        return self

    def heartbeat(self) -> None:
        with self.db.transaction() as conn:
            conn.execute(sa.update(nodes).where(nodes.c.id == self.id)
                         .values(heartbeat_at=time.time()))

    def stopped(self) -> None:
        with self.db.transaction() as conn:
            conn.execute(sa.update(nodes).where(nodes.c.id == self.id)
                         .values(stopped_at=time.time()))
