"""SCSI block target (SBC-3 / SPC-4) served to the host over USB mass storage.

`ScsiTarget` implements `firmware.logical_unit.LogicalUnit` over a `firmware.storage.BlockStore`.
Modules: `opcodes` (names), `sense` (sense data), `cdb` (decode + the single `check_command`),
`pages` (INQUIRY / VPD / mode pages), `target` (execution and counters). See docs/SCSI.md.
"""

from firmware.scsi.pages import naa_locally_assigned
from firmware.scsi.target import ScsiTarget

__all__ = ["ScsiTarget", "naa_locally_assigned"]
