"""The one definition of a configured remote unit, as the local unit's configuration names it.

`--remote HOST:PORT[,mode=async|sync][,name=N][,bandwidth_limit=SIZE]` on the command line, or one
`[[remote]]` table in the TOML configuration, becomes one `RemoteSpec`. The command line parses it
(`firmware.cli.parse_remote`); the replicator and its source sessions use it as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 7420


@dataclass(frozen=True)
class RemoteSpec:
    """One remote unit the local unit replicates to."""

    address: tuple[str, int] | str
    mode: str = "async"  # "sync": the host's write waits for this remote's acknowledgement
    name: str | None = None  # the name its certificate must carry (None: any remote of the CA)
    bandwidth_limit_bps: int | None = None  # bytes per second on the wire; None = unlimited
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # settings as configured

    @property
    def host_port(self) -> tuple[str, int]:
        if isinstance(self.address, tuple):
            return self.address
        host, _, port = self.address.rpartition(":")
        return (host.strip("[]") or "127.0.0.1", int(port) if port else DEFAULT_PORT)

    @property
    def label(self) -> str:
        h, p = self.host_port
        return f"{h}:{p}"
