"""The journey link: the sans-IO protocol that carries a local unit's journal to remote units.

`firmware.link.protocol` holds frames, events and the connection state machine. The socket half is
`firmware.link_transport`, the loop that runs a connection on either end is `firmware.link_driver`,
wired by `firmware.replicator` (source side) and `firmware.remote_unit` (remote side).
"""

from firmware.link.protocol import (
    NEED_DATA,
    Ack,
    Batch,
    ConnState,
    DigestRequest,
    Error,
    ErrorCode,
    Event,
    Feature,
    Heartbeat,
    Hello,
    HelloReply,
    JourneyConnection,
    ProtocolError,
    Purpose,
    Record,
    RecordKind,
    RegionData,
    RegionDigests,
    ReplyFlag,
    ResyncBegin,
    ResyncEnd,
    Role,
)

__all__ = [
    "NEED_DATA", "Ack", "Batch", "ConnState", "DigestRequest", "Error", "ErrorCode", "Event", "Feature",
    "Heartbeat", "Hello", "HelloReply", "JourneyConnection", "ProtocolError", "Purpose", "Record",
    "RecordKind", "RegionData", "RegionDigests", "ReplyFlag", "ResyncBegin", "ResyncEnd", "Role",
]
