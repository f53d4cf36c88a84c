"""The unit's identity: a UUID created once and kept in the state directory.

The USB serial number, the SCSI unit serial (VPD 0x80) and device identifier (VPD 0x83, an NAA 3
identifier made by `firmware.scsi.naa_locally_assigned` in `firmware.local_main`) are all derived
from it, so a host sees the same disk across restarts and reflashes of the firmware (as long as the
state directory survives).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from firmware.atomic import write_atomically

IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class UnitIdentity:
    unit_uuid: uuid.UUID

    @property
    def serial(self) -> str:
        """USB/SCSI serial: 24 upper-case hex digits (BOT 4.1.1 asks for at least 12 of 0-9A-F)."""
        return self.unit_uuid.hex[:24].upper()


def load_or_create(state_dir: str | os.PathLike[str]) -> UnitIdentity:
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    p = d / IDENTITY_FILE
    if p.exists():
        try:
            data = json.loads(p.read_text())
            return UnitIdentity(uuid.UUID(data["unit_uuid"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{p} is damaged ({exc}); restore it from a backup or remove it to "
                             "give this unit a new identity (hosts will see a different disk)") from exc
    ident = UnitIdentity(uuid.uuid4())
    write_atomically(p, json.dumps({"unit_uuid": str(ident.unit_uuid)}).encode() + b"\n")
    return ident
