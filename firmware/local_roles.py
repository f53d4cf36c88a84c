"""A local unit's role towards its remotes (docs/FAILOVER.md): the adapter between the role state in
its state directory, the replicator's links and the local unit.

`generations()` is what the replicator sends after each HELLO: this unit's data generations, so a
replica follows the generation whose writes it applies.
"""

from __future__ import annotations

import logging
from typing import Any

from firmware.failover.state import RoleStore
from firmware.link import protocol as jp

log = logging.getLogger(__name__)


class LocalRoles:
    """The role state of one local unit's source, as its replicator and status see it."""

    def __init__(self, roles: RoleStore, unit: Any, journal: Any) -> None:
        self.roles = roles
        self.unit = unit
        self.journal = journal

    def generations(self) -> jp.Generations:
        st = self.roles.state
        return jp.Generations(st.history.as_tuples(),
                              jp.GenerationsFlag.PRIMARY if st.primary else jp.GenerationsFlag.NONE)
