"""Operational text negotiation (RFC 7143 section 13): the keys this target understands, how each one
is settled, and the values a session runs with afterwards.

Sans-IO and pure: `negotiate(offered, ours, current)` answers one batch of keys from the initiator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What the target is willing to do (its side of every negotiation)."""

    max_recv_data_segment: int = 256 * 1024  # what the target can receive in one PDU
    max_burst: int = 1024 * 1024
    first_burst: int = 256 * 1024
    max_outstanding_r2t: int = 8
    immediate_data: bool = True
    initial_r2t: bool = False  # we allow unsolicited data; the result is the OR with the initiator's
    cmd_window: int = 64  # commands the target accepts beyond ExpCmdSN


@dataclass(frozen=True, slots=True)
class SessionParams:
    """Negotiated values (RFC 7143 defaults until negotiated)."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_initiator: int = 8192  # what we may send in one PDU
    max_burst: int = 262144
    first_burst: int = 65536
    max_outstanding_r2t: int = 1
    immediate_data: bool = True
    initial_r2t: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_connections: int = 1
    extra: dict[str, str] = field(default_factory=dict)


class NegotiationError(ValueError):
    """The initiator offered a value it may not (out of range, not a number): login fails."""


_BOOL = {"Yes": True, "No": False}

# Keys a target answers with "Irrelevant"/"NotUnderstood"-free fixed values (RFC 7143 13.x, and the
# marker keys of RFC 3720 that 7143 removed but older initiators still send).
_FIXED = {
    "MaxConnections": "1",
    "ErrorRecoveryLevel": "0",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "IFMarker": "No",
    "OFMarker": "No",
    "OFMarkInt": "Irrelevant",
    "IFMarkInt": "Irrelevant",
}
# Keys that only make sense in the login's first PDU or are declarations handled by the caller.
DECLARATIVE = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType", "AuthMethod"})


def _number(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value, 0)
    except ValueError as exc:
        raise NegotiationError(f"{key}={value!r} is not a number") from exc
    if not lo <= n <= hi:
        raise NegotiationError(f"{key}={n} outside {lo}..{hi}")
    return n


def _boolean(key: str, value: str) -> bool:
    try:
        return _BOOL[value]
    except KeyError as exc:
        raise NegotiationError(f"{key}={value!r} is neither Yes nor No") from exc


def _digest(key: str, value: str) -> bool:
    offered = [v.strip() for v in value.split(",")]
    for v in offered:  # the initiator's order of preference; we support both
        if v == "CRC32C":
            return True
        if v == "None":
            return False
    raise NegotiationError(f"{key}={value!r}: neither CRC32C nor None offered")


def negotiate(
    offered: list[tuple[str, str]], ours: TargetLimits, current: SessionParams
) -> tuple[list[tuple[str, str]], SessionParams]:
    """Answer the operational keys in `offered` (keys in DECLARATIVE are skipped: the login state
    machine deals with them). Returns the answer pairs and the updated parameters."""
    answer: list[tuple[str, str]] = []
    p = current
    for key, value in offered:
        if key in DECLARATIVE or key.startswith("CHAP_"):
            continue
        if key == "HeaderDigest":
            on = _digest(key, value)
            p = replace(p, header_digest=on)
            answer.append((key, "CRC32C" if on else "None"))
        elif key == "DataDigest":
            on = _digest(key, value)
            p = replace(p, data_digest=on)
            answer.append((key, "CRC32C" if on else "None"))
        elif key == "MaxRecvDataSegmentLength":
            # declarative: the initiator's receive limit; ours is declared separately by the caller
            p = replace(p, max_recv_data_segment_initiator=_number(key, value, 512, (1 << 24) - 1))
        elif key == "MaxBurstLength":
            n = min(_number(key, value, 512, (1 << 24) - 1), ours.max_burst)
            p = replace(p, max_burst=n, first_burst=min(p.first_burst, n))
            answer.append((key, str(n)))
        elif key == "FirstBurstLength":
            n = min(_number(key, value, 512, (1 << 24) - 1), ours.first_burst)
            p = replace(p, first_burst=n)
            answer.append((key, str(n)))
        elif key == "MaxOutstandingR2T":
            n = min(_number(key, value, 1, 65535), ours.max_outstanding_r2t)
            p = replace(p, max_outstanding_r2t=n)
            answer.append((key, str(n)))
        elif key == "ImmediateData":  # AND
            on = _boolean(key, value) and ours.immediate_data
            p = replace(p, immediate_data=on)
            answer.append((key, "Yes" if on else "No"))
        elif key == "InitialR2T":  # OR
            on = _boolean(key, value) or ours.initial_r2t
            p = replace(p, initial_r2t=on)
            answer.append((key, "Yes" if on else "No"))
        elif key == "DefaultTime2Wait":  # max
            n = max(_number(key, value, 0, 3600), 2)
            p = replace(p, default_time2wait=n)
            answer.append((key, str(n)))
        elif key == "DefaultTime2Retain":  # min; with ERL 0 nothing is retained
            n = min(_number(key, value, 0, 3600), 0)
            p = replace(p, default_time2retain=n)
            answer.append((key, str(n)))
        elif key in _FIXED:
            answer.append((key, _FIXED[key]))
        else:
            answer.append((key, "NotUnderstood"))
    if p.first_burst > p.max_burst:
        p = replace(p, first_burst=p.max_burst)
    return answer, p
