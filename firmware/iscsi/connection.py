"""One iSCSI connection (and its single-connection session) as a sans-IO state machine, RFC 7143.

The adapter feeds received bytes to `receive()`, hands the `ScsiTask`s it gets from `take_tasks()`
to the SCSI target (several may run at once), reports each outcome with `task_done()`, and sends
what `take_output()` returns. `closed` tells it to send the rest and close the socket.

Covered: login (security stage with CHAP or none, operational negotiation, SendTargets discovery,
an initiator ACL), SCSI Command/Response with immediate and unsolicited data, R2T/Data-Out, Data-In
with status in the last PDU, NOP-Out/NOP-In, task management (ABORT TASK, ABORT TASK SET, CLEAR TASK
SET, LUN RESET, TARGET WARM/COLD RESET), Text, Logout, the CmdSN window (commands in flight up to the
window; a non-immediate command outside it is ignored, RFC 7143 4.2.2.1), Reject for bad PDUs.

Error recovery level 0 only (one connection per session, no SNACK, no task reassignment): a
header digest error, a framing error or a protocol violation drops the connection after a Reject,
and the initiator logs in again. Commands that were executing then still complete on the store
(their outcome is simply not reported), which is what ERL 0 allows.

No sockets, threads or clocks inside: `now` is passed in, random bytes (the CHAP challenge) come
from the `random` callable the adapter supplies.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware.iscsi.params import NegotiationError, SessionParams, TargetLimits, negotiate
from firmware.iscsi.pdu import (
    RESERVED_TAG,
    DataDigestError,
    Framer,
    Pdu,
    PduError,
    PduOpcode,
    RejectReason,
    TextError,
    build_text,
    parse_text,
)
from firmware.iscsi.pdu import (
    digest as wire_digest,
)
from firmware.logical_unit import CommandPlan, Direction
from firmware.scsi.sense import Sense

log = logging.getLogger(__name__)

Planner = Callable[[bytes], CommandPlan]

_LOGIN_MAX_TEXT = 64 * 1024  # the whole text of one login/text exchange
_MAX_CHAP_CHALLENGE = 1024  # bytes of an initiator's CHAP_C (RFC 7143 12.1.3 leaves the length open)
_STATUS_GOOD = 0x00
_STATUS_CHECK_CONDITION = 0x02
_STATUS_TASK_ABORTED = 0x40
_LUN_NOT_SUPPORTED = Sense(0x05, 0x25, 0x00).to_fixed()  # ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED
_INVALID_FIELD_IN_CDB = Sense(0x05, 0x24, 0x00).to_fixed()
_DATA_SEQUENCE_ERROR = Sense(0x0B, 0x4B, 0x00).to_fixed()  # ABORTED COMMAND, DATA PHASE ERROR


class Phase(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full_feature"
    CLOSED = "closed"


class LoginStatus(enum.IntEnum):
    """Status-Class << 8 | Status-Detail (RFC 7143 11.13.5)."""

    SUCCESS = 0x0000
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILED = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    UNSUPPORTED_VERSION = 0x0205
    MISSING_PARAMETER = 0x0207
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_REASSIGN_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    FUNCTION_REJECTED = 255


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One target (one LUN) as it is offered to initiators."""

    target_name: str  # the IQN
    portal: str  # "host:port" as SendTargets reports it
    portal_group_tag: int = 1
    alias: str = ""
    chap: tuple[str, str] | None = None  # (user, secret) the initiator must prove
    # (name, secret) the target proves to an initiator that asks it to (mutual CHAP)
    mutual_chap: tuple[str, str] | None = None
    allowed_initiators: frozenset[str] | None = None  # None: any initiator name
    limits: TargetLimits = field(default_factory=TargetLimits)


@dataclass(frozen=True, slots=True)
class ScsiTask:
    """A command ready to run: the adapter calls the SCSI target and reports with `task_done`."""

    task_id: int
    cdb: bytes
    data_out: bytes
    lun_ok: bool  # False: the LUN does not exist and the command must not reach the target


@dataclass(slots=True)
class _Task:
    task_id: int
    itt: int
    lun: bytes
    cdb: bytes
    cmdsn: int
    edtl: int
    read: bool
    write: bool
    plan: CommandPlan
    lun_ok: bool
    need: int = 0  # data-out bytes the target will use
    buf: bytearray | None = None  # made when the data arrives in pieces
    whole: bytes | None = None  # the data when it all came in one piece (no copy)
    received: int = 0  # next expected buffer offset
    unsolicited_open: bool = False
    solicited: int = 0  # buffer offset up to which R2Ts were sent
    r2ts: dict[int, int] = field(default_factory=dict)  # TTT -> end offset of that R2T
    r2tsn: int = 0
    datasn: dict[int, int] = field(default_factory=dict)  # TTT (or the reserved tag) -> next DataSN
    data_error: bool = False  # a Data-Out arrived out of DataSN sequence: fail, do not run
    executing: bool = False
    aborted: bool = False


@dataclass(slots=True)
class _Waiter:
    """A TMF or Logout response held until the tasks it waits for have ended."""

    task_ids: set[int]
    respond: Callable[[], None]


def serial_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number arithmetic on 32 bits: a < b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def _lun_is_zero(lun: bytes) -> bool:
    return not any(lun[:8])


class _LoginFailed(Exception):
    def __init__(self, status: LoginStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


class Connection:
    """One connection from accept to close. Not thread-safe: the adapter serialises calls."""

    def __init__(
        self,
        config: TargetConfig,
        planner: Planner,
        *,
        random: Callable[[int], bytes],
        peer: str = "",
        strict: bool = False,
        block_size: int = 512,
    ) -> None:
        self.config = config
        self._block_size = block_size
        self._plan = planner
        self._random = random
        self.peer = peer
        self._strict = strict  # re-raise unexpected exceptions (tests and fuzzing)
        self.phase = Phase.LOGIN
        self.close_reason = ""
        self.params = SessionParams()
        self.initiator_name = ""
        self.session_type = ""
        self.isid = b""
        self.tsih = 0
        self._framer = Framer(max_data=8192)
        self._out: list[bytes] = []
        self._stat_sn = 0
        self._exp_cmdsn = 0
        self._max_cmdsn = 0
        self._tasks: dict[int, _Task] = {}  # by ITT
        self._by_id: dict[int, _Task] = {}
        self._ready: list[ScsiTask] = []
        self._waiters: list[_Waiter] = []
        self._next_task_id = 1
        self._next_ttt = 1
        # login state
        self._login_started = False
        self._stage = 0
        self._login_itt = 0
        self._login_text = bytearray()
        self._auth_done = False
        self._chap_id = 0
        self._chap_challenge = b""
        self._declared = False
        self._text_buf = bytearray()
        self.counters: dict[str, int] = {"commands": 0, "rejects": 0, "ignored_cmdsn": 0, "digest_errors": 0,
                                         "pings": 0, "ping_answers": 0}
        self.resets = 0  # LOGICAL UNIT RESET and TARGET WARM/COLD RESET received (the adapter resets the unit)

    # ---- the adapter's interface --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def stat_sn(self) -> int:
        return self._stat_sn

    @property
    def exp_cmdsn(self) -> int:
        return self._exp_cmdsn

    @property
    def max_cmdsn(self) -> int:
        return self._max_cmdsn

    @property
    def nexus(self) -> str:
        """The I_T nexus of this session's initiator port, as a SCSI TransportID names it
        (SPC-4 7.6.4.6): the initiator name, ",i,0x" and the ISID in hex."""
        return f"{self.initiator_name},i,0x{self.isid.hex()}"

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self._framer.feed(data)
        while not self.closed:
            try:
                item = self._framer.next()
            except PduError as exc:
                if exc.header:
                    self._reject(exc.reason, exc.header)
                self._close(f"framing: {exc}")
                return
            if item is None:
                return
            try:
                if isinstance(item, DataDigestError):
                    self.counters["digest_errors"] += 1
                    self._reject(RejectReason.DATA_DIGEST_ERROR, bytes(item.pdu.bhs))
                    self._close("data digest error")  # ERL 0: the data of that command is lost
                    return
                self._dispatch(item)
            except Exception as exc:
                if self._strict:
                    raise
                log.exception("iscsi connection failed peer=%s", self.peer)
                self._close(f"internal error: {exc}")

    def take_tasks(self) -> list[ScsiTask]:
        ready, self._ready = self._ready, []
        return ready

    def take_output(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def ping(self) -> None:
        """Queue a NOP-In ping (RFC 7143 11.19): the initiator answers with a NOP-Out echoing its
        Target Transfer Tag. Only in the full feature phase; StatSN is not advanced."""
        if self.phase is not Phase.FULL_FEATURE:
            return
        pdu = Pdu.new(PduOpcode.NOP_IN, flags=0x80)
        pdu.set_u32(16, RESERVED_TAG)
        ttt = self._next_ttt
        self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1
        pdu.set_u32(20, ttt)
        self.counters["pings"] += 1
        self._send(pdu, stat_sn="peek")

    def task_done(self, task_id: int, status: int, data: bytes = b"", sense: bytes = b"") -> None:
        """The outcome of a task from `take_tasks()` (status byte, DATA-IN, sense for CHECK CONDITION)."""
        task = self._by_id.pop(task_id, None)
        if task is None:
            return
        self._tasks.pop(task.itt, None)
        if not task.aborted and not self.closed:
            self._respond_scsi(task, status, data, sense)
        self._task_ended(task_id)

    # ---- dispatch -----------------------------------------------------------------------------

    def _dispatch(self, pdu: Pdu) -> None:
        op = pdu.bhs[0] & 0x3F
        if op == _OP_SCSI_COMMAND and self.phase is Phase.FULL_FEATURE:  # the common case first
            if self._accept_cmdsn(pdu):
                self._scsi_command(pdu)
            return
        if self.phase is Phase.LOGIN:
            if op != PduOpcode.LOGIN_REQUEST:
                self._close(f"opcode 0x{op:02x} before login completed")
                return
            self._login(pdu)
            return
        if op == PduOpcode.LOGIN_REQUEST:
            self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
            self._close("login request in full feature phase")
            return
        if op == PduOpcode.DATA_OUT:
            self._data_out(pdu)
            return
        if op == PduOpcode.SNACK_REQUEST:
            self._reject(RejectReason.COMMAND_NOT_SUPPORTED, bytes(pdu.bhs))  # ERL 0
            return
        if op not in (
            PduOpcode.NOP_OUT,
            PduOpcode.SCSI_COMMAND,
            PduOpcode.TASK_MGMT_REQUEST,
            PduOpcode.TEXT_REQUEST,
            PduOpcode.LOGOUT_REQUEST,
        ):
            self._reject(RejectReason.COMMAND_NOT_SUPPORTED, bytes(pdu.bhs))
            return
        if not self._accept_cmdsn(pdu):
            return
        if op == PduOpcode.NOP_OUT:
            self._nop_out(pdu)
        elif op == PduOpcode.SCSI_COMMAND:
            self._scsi_command(pdu)
        elif op == PduOpcode.TASK_MGMT_REQUEST:
            self._task_mgmt(pdu)
        elif op == PduOpcode.TEXT_REQUEST:
            self._text(pdu)
        else:
            self._logout(pdu)

    def _accept_cmdsn(self, pdu: Pdu) -> bool:
        if pdu.opcode == PduOpcode.NOP_OUT and pdu.itt == RESERVED_TAG:
            return True  # an answer to our NOP-In: no CmdSN semantics
        cmdsn = pdu.u32(24)
        if pdu.immediate:
            return True
        if cmdsn == self._exp_cmdsn and not serial_lt(self._max_cmdsn, cmdsn):
            self._exp_cmdsn = (self._exp_cmdsn + 1) & 0xFFFFFFFF
            return True
        # one connection per session: a gap can never be filled, a command behind or beyond the
        # window is ignored (RFC 7143 4.2.2.1)
        self.counters["ignored_cmdsn"] += 1
        log.warning(
            "command ignored: CmdSN outside the window peer=%s cmdsn=%d exp_cmdsn=%d max_cmdsn=%d",
            self.peer, cmdsn, self._exp_cmdsn, self._max_cmdsn,
        )
        return False

    # ---- building responses -------------------------------------------------------------------

    def _window(self) -> tuple[int, int]:
        """(ExpCmdSN, MaxCmdSN) to put in a response; MaxCmdSN never moves back."""
        free = max(0, self.config.limits.cmd_window - len(self._tasks))
        candidate = (self._exp_cmdsn + free - 1) & 0xFFFFFFFF
        if serial_lt(self._max_cmdsn, candidate):
            self._max_cmdsn = candidate
        return self._exp_cmdsn, self._max_cmdsn

    def _send(self, pdu: Pdu, *, stat_sn: str = "advance") -> None:
        """Fill StatSN ("advance": this PDU consumes it, "peek": carries the next one without
        consuming it, "none": the field is reserved), ExpCmdSN, MaxCmdSN and queue the PDU."""
        if stat_sn != "none":
            pdu.set_u32(24, self._stat_sn)
        if stat_sn == "advance":
            self._stat_sn = (self._stat_sn + 1) & 0xFFFFFFFF
        exp, mx = self._window()
        pdu.set_u32(28, exp)
        pdu.set_u32(32, mx)
        digests = self.phase is Phase.FULL_FEATURE
        self._out.append(
            pdu.encode(
                header_digest=digests and self.params.header_digest,
                data_digest=digests and self.params.data_digest,
            )
        )

    def _reject(self, reason: RejectReason, header: bytes) -> None:
        self.counters["rejects"] += 1
        log.warning("reject peer=%s reason=%s opcode=0x%02x", self.peer, reason.name, header[0] & 0x3F if header else 0)
        pdu = Pdu.new(PduOpcode.REJECT, flags=0x80)
        pdu.bhs[2] = int(reason)
        pdu.set_u32(16, RESERVED_TAG)
        pdu.data = header[:48]
        self._send(pdu)

    def _close(self, why: str) -> None:
        if self.phase is not Phase.CLOSED:
            log.info("iscsi connection closing peer=%s initiator=%s reason=%s", self.peer, self.initiator_name, why)
            self.phase = Phase.CLOSED
            self.close_reason = why
            for task in self._tasks.values():
                task.aborted = True
            self._ready.clear()

    # ---- login (RFC 7143 6.3, 11.12, 11.13) --------------------------------------------------

    def _login(self, pdu: Pdu) -> None:
        flags = pdu.flags
        transit, cont = bool(flags & 0x80), bool(flags & 0x40)
        csg, nsg = (flags >> 2) & 3, flags & 3
        if not self._login_started:
            self._login_started = True
            self.isid = pdu.lun[:6]
            self.tsih = int.from_bytes(pdu.lun[6:8], "big")
            self._login_itt = pdu.itt
            self._exp_cmdsn = pdu.u32(24)
            self._max_cmdsn = (self._exp_cmdsn + self.config.limits.cmd_window - 1) & 0xFFFFFFFF
            self._stat_sn = pdu.u32(28)
        try:
            if pdu.bhs[3] > 0:  # Version-min
                raise _LoginFailed(LoginStatus.UNSUPPORTED_VERSION, f"version-min {pdu.bhs[3]}")
            if self.tsih:
                raise _LoginFailed(LoginStatus.SESSION_DOES_NOT_EXIST, f"TSIH {self.tsih}: sessions have one connection")
            if transit and cont:
                raise _LoginFailed(LoginStatus.INITIATOR_ERROR, "T and C both set")
            if csg == 2 or csg == 3 or (transit and nsg <= csg) or nsg == 2:
                raise _LoginFailed(LoginStatus.INITIATOR_ERROR, f"stage CSG={csg} NSG={nsg} at stage {self._stage}")
            if csg != self._stage:
                if not (csg == 1 and self._stage == 0 and self._may_skip_security()):
                    raise _LoginFailed(LoginStatus.INITIATOR_ERROR, f"stage CSG={csg} NSG={nsg} at stage {self._stage}")
                self._stage = 1
            if len(self._login_text) + len(pdu.data) > _LOGIN_MAX_TEXT:
                raise _LoginFailed(LoginStatus.INITIATOR_ERROR, "login text too long")
            self._login_text += pdu.data
            if cont:
                self._login_response(pdu, csg, nsg, transit=False, cont=False, data=b"")
                return
            text, self._login_text = bytes(self._login_text), bytearray()
            try:
                pairs = parse_text(text)
            except TextError as exc:
                raise _LoginFailed(LoginStatus.INITIATOR_ERROR, str(exc)) from exc
            answer = self._login_keys(pairs, csg)
            if transit and csg == 0 and not self._auth_done:
                transit = False  # authentication goes on
            if transit and nsg == 3 and not self._auth_done:
                raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, "full feature phase requested before authentication")
            if transit and not self._declared and nsg == 3:
                answer.append(("MaxRecvDataSegmentLength", str(self.config.limits.max_recv_data_segment)))
                self._declared = True
            if transit and nsg == 3:
                self.tsih = 1
            self._login_response(pdu, csg, nsg if transit else 0, transit=transit, cont=False, data=build_text(answer))
            if transit:
                self._stage = nsg
                if nsg == 3:
                    self._enter_full_feature()
        except _LoginFailed as exc:
            log.warning(
                "login refused peer=%s initiator=%s status=%s reason=%s",
                self.peer, self.initiator_name or "?", exc.status.name, exc,
            )
            self._login_response(pdu, csg, 0, transit=False, cont=False, data=b"", status=exc.status)
            self._close(f"login refused: {exc.status.name}")
        except NegotiationError as exc:
            log.warning("login refused peer=%s initiator=%s reason=%s", self.peer, self.initiator_name or "?", exc)
            self._login_response(pdu, csg, 0, transit=False, cont=False, data=b"", status=LoginStatus.INITIATOR_ERROR)
            self._close("login refused: negotiation")

    def _may_skip_security(self) -> bool:
        return self.config.chap is None

    def _login_keys(self, pairs: list[tuple[str, str]], csg: int) -> list[tuple[str, str]]:
        keys = dict(pairs)
        answer: list[tuple[str, str]] = []
        if not self.session_type:
            name = keys.get("InitiatorName")
            if not name:
                raise _LoginFailed(LoginStatus.MISSING_PARAMETER, "no InitiatorName")
            self.initiator_name = name
            stype = keys.get("SessionType", "Normal")
            if stype not in ("Normal", "Discovery"):
                raise _LoginFailed(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType={stype}")
            self.session_type = stype
            if stype == "Normal":
                target = keys.get("TargetName")
                if not target:
                    raise _LoginFailed(LoginStatus.MISSING_PARAMETER, "no TargetName")
                if target != self.config.target_name:
                    raise _LoginFailed(LoginStatus.NOT_FOUND, f"unknown target {target}")
                acl = self.config.allowed_initiators
                if acl is not None and name not in acl:
                    raise _LoginFailed(LoginStatus.AUTHORIZATION_FAILURE, f"initiator {name} not in the ACL")
                answer.append(("TargetPortalGroupTag", str(self.config.portal_group_tag)))
                if self.config.alias:
                    answer.append(("TargetAlias", self.config.alias))
            if self.config.chap is None and csg == 1:
                self._auth_done = True
        if csg == 0:
            answer += self._security(keys)
        elif self.config.chap is None:
            self._auth_done = True
        ops, self.params = negotiate(pairs, self.config.limits, self.params)
        return answer + ops

    def _security(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        answer: list[tuple[str, str]] = []
        chap = self.config.chap
        if "AuthMethod" in keys:
            offered = [m.strip() for m in keys["AuthMethod"].split(",")]
            if chap is not None:
                if "CHAP" not in offered:
                    raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, f"CHAP required, offered {offered}")
                answer.append(("AuthMethod", "CHAP"))
            else:
                if "None" not in offered:
                    raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, f"only AuthMethod None, offered {offered}")
                answer.append(("AuthMethod", "None"))
                self._auth_done = True
        elif chap is None:
            self._auth_done = True
        if chap is None:
            return answer
        if "CHAP_A" in keys:
            if "5" not in [a.strip() for a in keys["CHAP_A"].split(",")]:
                raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, f"CHAP_A={keys['CHAP_A']}: MD5 (5) required")
            self._chap_id = self._random(1)[0]
            self._chap_challenge = self._random(16)
            answer += [("CHAP_A", "5"), ("CHAP_I", str(self._chap_id)), ("CHAP_C", "0x" + self._chap_challenge.hex())]
        if "CHAP_R" in keys or "CHAP_N" in keys:
            if not self._chap_challenge:
                raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, "CHAP response without a challenge")
            proof = self._mutual_proof(keys)  # checked before the initiator's answer is
            user, secret = chap
            expected = hashlib.md5(bytes([self._chap_id]) + secret.encode() + self._chap_challenge).digest()
            got = _chap_binary(keys.get("CHAP_R", ""))
            self._chap_challenge = b""  # one answer per challenge
            if keys.get("CHAP_N") != user or got is None or not hmac.compare_digest(got, expected):
                raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, f"CHAP failed for user {keys.get('CHAP_N')!r}")
            log.info("chap authenticated peer=%s initiator=%s user=%s", self.peer, self.initiator_name, user)
            if proof:
                answer += proof
                log.info("mutual chap: the target answered the initiator's challenge peer=%s name=%s",
                         self.peer, proof[0][1])
            elif self.config.mutual_chap is not None:
                log.info("mutual chap configured, but the initiator did not ask the target to authenticate peer=%s",
                         self.peer)
            self._auth_done = True
        return answer

    def _mutual_proof(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """The target's CHAP_N/CHAP_R when the initiator sent CHAP_I and CHAP_C (RFC 7143 12.1.3),
        else []. Refused: mutual CHAP not configured, a malformed identifier or challenge, or the
        target's own challenge sent back (a reflection)."""
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        mutual = self.config.mutual_chap
        if mutual is None:
            raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED,
                               "the initiator asked the target to authenticate (mutual CHAP), none is configured")
        ident_text, challenge_text = keys.get("CHAP_I", ""), keys.get("CHAP_C", "")
        if not ident_text.isdigit() or int(ident_text) > 255:
            raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, f"mutual CHAP: bad CHAP_I {ident_text[:16]!r}")
        challenge = _chap_binary(challenge_text)
        if challenge is None or not 1 <= len(challenge) <= _MAX_CHAP_CHALLENGE:
            raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, "mutual CHAP: bad CHAP_C")
        if challenge == self._chap_challenge:
            raise _LoginFailed(LoginStatus.AUTHENTICATION_FAILED, "mutual CHAP: the target's own challenge sent back")
        name, secret = mutual
        digest = hashlib.md5(bytes([int(ident_text)]) + secret.encode() + challenge).hexdigest()
        return [("CHAP_N", name), ("CHAP_R", "0x" + digest)]

    def _login_response(
        self,
        req: Pdu,
        csg: int,
        nsg: int,
        *,
        transit: bool,
        cont: bool,
        data: bytes,
        status: LoginStatus = LoginStatus.SUCCESS,
    ) -> None:
        flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
        pdu = Pdu.new(PduOpcode.LOGIN_RESPONSE, flags=flags)
        pdu.bhs[2] = 0  # Version-max
        pdu.bhs[3] = 0  # Version-active
        pdu.bhs[8:14] = self.isid.ljust(6, b"\0")
        pdu.bhs[14:16] = (self.tsih if status == LoginStatus.SUCCESS else 0).to_bytes(2, "big")
        pdu.set_u32(16, req.itt)
        pdu.bhs[36] = int(status) >> 8
        pdu.bhs[37] = int(status) & 0xFF
        pdu.data = data
        self._send(pdu)

    def _enter_full_feature(self) -> None:
        self.phase = Phase.FULL_FEATURE
        self._framer.header_digest = self.params.header_digest
        self._framer.data_digest = self.params.data_digest
        self._framer.max_data = self.config.limits.max_recv_data_segment
        log.info(
            "iscsi login peer=%s initiator=%s session=%s header_digest=%s data_digest=%s "
            "max_burst=%d first_burst=%d immediate_data=%s initial_r2t=%s",
            self.peer, self.initiator_name, self.session_type, self.params.header_digest, self.params.data_digest,
            self.params.max_burst, self.params.first_burst, self.params.immediate_data, self.params.initial_r2t,
        )

    # ---- full feature phase -------------------------------------------------------------------

    def _nop_out(self, pdu: Pdu) -> None:
        if pdu.itt == RESERVED_TAG:
            if pdu.u32(20) != RESERVED_TAG:
                self.counters["ping_answers"] += 1
            return  # an answer to a NOP-In ping (or a one-way ping): nothing to send
        rsp = Pdu.new(PduOpcode.NOP_IN, flags=0x80)
        rsp.set_lun(pdu.lun)
        rsp.set_u32(16, pdu.itt)
        rsp.set_u32(20, RESERVED_TAG)
        rsp.data = pdu.data[: self.params.max_recv_data_segment_initiator]
        self._send(rsp)

    def _scsi_command(self, pdu: Pdu) -> None:
        if self.session_type != "Normal":
            self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
            self._close("SCSI command in a discovery session")
            return
        flags, lun, itt, edtl, cmdsn, cdb = _SCSI_COMMAND_BHS.unpack_from(pdu.bhs)
        if itt in self._tasks or itt == RESERVED_TAG:
            reason = RejectReason.TASK_IN_PROGRESS if itt != RESERVED_TAG else RejectReason.INVALID_PDU_FIELD
            self._reject(reason, bytes(pdu.bhs))
            return
        self.counters["commands"] += 1
        read, write = bool(flags & 0x40), bool(flags & 0x20)
        bidi = False
        at = 0
        while at + 4 <= len(pdu.ahs):  # AHS: length(2) type(1) specific(1) data, padded to 4
            length, ahs_type = struct.unpack_from(">HB", pdu.ahs, at)
            body = pdu.ahs[at + 4 : at + 3 + length]
            if ahs_type == 1:
                cdb += body
            elif ahs_type == 2:
                bidi = True
            at += 4 + ((length - 1 + 3) & ~3 if length else 0)
        lun_ok = lun == _LUN_ZERO
        plan = self._plan(cdb) if lun_ok else CommandPlan(Direction.NONE, 0)
        run_cdb = cdb
        if plan.direction is Direction.OUT and edtl < plan.length and cdb[0] in _WRITE_LENGTH_FIELD:
            # RFC 7143 / SAM-5: the initiator will send only EDTL bytes; write the whole blocks of
            # those and report the rest as residual overflow, never blocks it did not send
            run_cdb = _with_transfer_length(cdb, edtl // self._block_size)
        task = _Task(
            task_id=self._next_task_id, itt=itt, lun=lun, cdb=run_cdb, cmdsn=cmdsn, edtl=edtl,
            read=read, write=write, plan=plan, lun_ok=lun_ok,
        )
        self._next_task_id += 1
        self._tasks[itt] = task
        self._by_id[task.task_id] = task
        if bidi or (read and write):
            self._finish_local(task, _STATUS_CHECK_CONDITION, _INVALID_FIELD_IN_CDB)
            return
        if cdb[0] == _COMPARE_AND_WRITE and edtl != plan.length and (plan.direction is Direction.OUT or not cdb[13]):
            # an atomic compare of part of the blocks would mean nothing: the initiator must send
            # exactly the 2 x NUMBER OF LOGICAL BLOCKS the CDB names, or the command is refused
            self._finish_local(task, _STATUS_CHECK_CONDITION, _INVALID_FIELD_IN_CDB)
            return
        if run_cdb is not cdb:
            task.need = edtl // self._block_size * self._block_size
        if write and edtl:
            if run_cdb is cdb:
                task.need = min(edtl, plan.length) if plan.direction is Direction.OUT else 0
            if pdu.data:
                if not self.params.immediate_data or len(pdu.data) > min(edtl, self.params.first_burst):
                    self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
                    self._close("immediate data not allowed or beyond FirstBurstLength/EDTL")
                    return
                self._take_data(task, 0, pdu.data)
            task.unsolicited_open = not pdu.final
            if task.unsolicited_open and (self.params.initial_r2t or task.received >= min(edtl, self.params.first_burst)):
                self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
                self._close("unsolicited data announced where none may follow")
                return
        elif pdu.data:
            self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
            self._close("data with a command that is not a write")
            return
        self._advance(task)

    def _take_data(self, task: _Task, offset: int, data: bytes) -> None:
        if offset != task.received:
            raise _ProtocolViolation(f"data at offset {offset}, expected {task.received}")
        end = offset + len(data)
        if end > task.edtl:
            raise _ProtocolViolation(f"data up to {end} beyond the expected length {task.edtl}")
        if offset < task.need:
            if offset == 0 and len(data) >= task.need:
                task.whole = data[: task.need]  # the common case: every byte in one PDU
            else:
                if task.buf is None:
                    task.buf = bytearray(task.need)
                piece = data[: task.need - offset]
                task.buf[offset : offset + len(piece)] = piece
        task.received = end

    def _advance(self, task: _Task) -> None:
        """Solicit what is missing or hand the task over for execution."""
        if task.executing or task.aborted:
            return
        if task.unsolicited_open:
            return
        if task.received >= task.need and not task.r2ts:
            task.executing = True
            if not task.lun_ok:
                self._finish_local(task, _STATUS_CHECK_CONDITION, _LUN_NOT_SUPPORTED)
                return
            if task.data_error:
                self._finish_local(task, _STATUS_CHECK_CONDITION, _DATA_SEQUENCE_ERROR)
                return
            data = b""
            if task.plan.direction is Direction.OUT:
                if task.whole is not None:
                    data = task.whole
                elif task.buf is not None:
                    data = bytes(task.buf)
                else:
                    data = bytes(task.need)
            self._ready.append(ScsiTask(task.task_id, task.cdb, data, task.lun_ok))
            return
        # R2Ts for [solicited, need), at most MaxBurstLength each and MaxOutstandingR2T at a time
        task.solicited = max(task.solicited, task.received)
        while task.solicited < task.need and len(task.r2ts) < self.params.max_outstanding_r2t:
            length = min(self.params.max_burst, task.need - task.solicited)
            ttt = self._next_ttt
            self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1
            task.r2ts[ttt] = task.solicited + length
            r2t = Pdu.new(PduOpcode.R2T, flags=0x80)
            r2t.set_lun(task.lun)
            r2t.set_u32(16, task.itt)
            r2t.set_u32(20, ttt)
            r2t.set_u32(36, task.r2tsn)
            r2t.set_u32(40, task.solicited)
            r2t.set_u32(44, length)
            task.r2tsn += 1
            task.solicited += length
            self._send(r2t, stat_sn="peek")

    def _data_out(self, pdu: Pdu) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or task.executing:
            log.debug("data-out for no waiting task peer=%s itt=0x%08x", self.peer, pdu.itt)
            return
        ttt = pdu.u32(20)
        try:
            if ttt == RESERVED_TAG:
                if not task.unsolicited_open:
                    raise _ProtocolViolation("unsolicited data-out after the unsolicited burst ended")
                if pdu.u32(40) + len(pdu.data) > min(task.edtl, self.params.first_burst):
                    raise _ProtocolViolation("unsolicited data beyond FirstBurstLength")
            elif ttt not in task.r2ts:
                raise _ProtocolViolation(f"data-out for unknown TTT 0x{ttt:08x}")
            elif pdu.u32(40) + len(pdu.data) > task.r2ts[ttt]:
                raise _ProtocolViolation("data-out beyond its R2T")
            expected = task.datasn.get(ttt, 0)
            if pdu.u32(36) != expected and not task.data_error:
                # the data is still taken by offset; the command fails instead of running
                log.warning("data-out out of sequence peer=%s itt=0x%08x datasn=%d expected=%d",
                            self.peer, task.itt, pdu.u32(36), expected)
                task.data_error = True
            task.datasn[ttt] = pdu.u32(36) + 1
            self._take_data(task, pdu.u32(40), pdu.data)
        except _ProtocolViolation as exc:
            self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
            self._close(f"data-out: {exc}")
            return
        if pdu.final:
            if ttt == RESERVED_TAG:
                task.unsolicited_open = False
            else:
                if task.received < task.r2ts[ttt]:
                    self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
                    self._close("R2T sequence ended short")
                    return
                del task.r2ts[ttt]
        self._advance(task)

    def _finish_local(self, task: _Task, status: int, sense: bytes) -> None:
        """Complete a task the SCSI target never sees (unknown LUN, unsupported framing)."""
        task.executing = True
        self._tasks.pop(task.itt, None)
        self._by_id.pop(task.task_id, None)
        self._respond_scsi(task, status, b"", sense)

    def _respond_scsi(self, task: _Task, status: int, data: bytes, sense: bytes) -> None:
        edtl = task.edtl
        if task.plan.direction is Direction.IN or data:
            sent = data[:edtl] if task.read else b""
            actual = len(data)
        else:
            sent = b""
            actual = task.plan.length if task.plan.direction is Direction.OUT else 0
        flags = 0x80
        residual = 0
        if actual > edtl or (actual and not (task.read or task.write)):
            flags |= 0x04  # overflow
            residual = actual - edtl if actual > edtl else actual
        elif actual < edtl:
            flags |= 0x02  # underflow
            residual = edtl - actual
        datasn = 0
        if sent:
            chunk = max(512, self.params.max_recv_data_segment_initiator)
            burst = self.params.max_burst
            off = 0
            while off < len(sent):
                n = min(chunk, len(sent) - off, burst - off % burst)
                last = off + n >= len(sent)
                pdu = Pdu.new(PduOpcode.DATA_IN)
                f = 0x80 if last or (off + n) % burst == 0 else 0
                with_status = last and status == _STATUS_GOOD
                if with_status:
                    f |= 0x01 | (flags & 0x06)
                    pdu.bhs[3] = status
                    pdu.set_u32(44, residual)
                pdu.bhs[1] = f
                pdu.set_lun(task.lun)
                pdu.set_u32(16, task.itt)
                pdu.set_u32(20, RESERVED_TAG)
                pdu.set_u32(36, datasn)
                pdu.set_u32(40, off)
                pdu.data = sent[off : off + n]
                self._send(pdu, stat_sn="advance" if with_status else "none")
                datasn += 1
                off += n
            if status == _STATUS_GOOD:
                return
        # the SCSI Response (RFC 7143 11.4), packed at once: one per command, the hot path
        seg = len(sense).to_bytes(2, "big") + sense if status == _STATUS_CHECK_CONDITION and sense else b""
        stat_sn = self._stat_sn
        self._stat_sn = (stat_sn + 1) & 0xFFFFFFFF
        exp, mx = self._window()
        # response 0: command completed at target; byte 4 (TotalAHSLength) is the top byte of the length word
        header = _SCSI_RESPONSE_BHS.pack(PduOpcode.SCSI_RESPONSE, flags, 0, status, len(seg), task.itt, 0, stat_sn,
                                         exp, mx, datasn or task.r2tsn, 0, residual)
        digests = self.phase is Phase.FULL_FEATURE
        if digests and self.params.header_digest:
            header += wire_digest(header)
        if seg:
            seg += bytes(-len(seg) & 3)
            if digests and self.params.data_digest:
                seg += wire_digest(seg)
            self._out.append(header + seg)
        else:
            self._out.append(header)

    # ---- task management, text, logout --------------------------------------------------------

    def _task_mgmt(self, pdu: Pdu) -> None:
        function = pdu.flags & 0x7F
        ref_itt = pdu.u32(20)
        itt = pdu.itt

        def respond(code: TmfResponse) -> Callable[[], None]:
            def send() -> None:
                rsp = Pdu.new(PduOpcode.TASK_MGMT_RESPONSE, flags=0x80)
                rsp.bhs[2] = int(code)
                rsp.set_u32(16, itt)
                self._send(rsp)

            return send

        log.info("task management peer=%s function=%d ref_itt=0x%08x", self.peer, function, ref_itt)
        if function == TmfFunction.ABORT_TASK:
            task = self._tasks.get(ref_itt)
            if task is None or (not _lun_is_zero(pdu.lun) and task.lun != pdu.lun):
                respond(TmfResponse.TASK_DOES_NOT_EXIST if task is None else TmfResponse.FUNCTION_COMPLETE)()
                return
            self._abort([task], respond(TmfResponse.FUNCTION_COMPLETE))
        elif function in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            if not _lun_is_zero(pdu.lun):
                respond(TmfResponse.LUN_DOES_NOT_EXIST)()
                return
            if function == TmfFunction.LOGICAL_UNIT_RESET:
                self.resets += 1
            # the TMF itself is not among the tasks; commands after it in CmdSN order are not aborted
            self._abort(list(self._tasks.values()), respond(TmfResponse.FUNCTION_COMPLETE))
        elif function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            self.resets += 1
            self._abort(list(self._tasks.values()), respond(TmfResponse.FUNCTION_COMPLETE))
            if function == TmfFunction.TARGET_COLD_RESET:
                self._close("target cold reset")
        elif function == TmfFunction.TASK_REASSIGN:
            respond(TmfResponse.TASK_REASSIGN_NOT_SUPPORTED)()
        else:
            respond(TmfResponse.FUNCTION_NOT_SUPPORTED)()

    def _abort(self, tasks: list[_Task], respond: Callable[[], None]) -> None:
        """Abort `tasks`: those not yet running end now; the response waits for those running."""
        running: set[int] = set()
        for task in tasks:
            task.aborted = True
            if task.executing:
                running.add(task.task_id)
            else:
                self._tasks.pop(task.itt, None)
                self._by_id.pop(task.task_id, None)
        # a task already taken by the adapter still reports task_done (its outcome is dropped);
        # one not yet taken never runs
        ids = {x.task_id for x in tasks}
        dropped = {t.task_id for t in self._ready if t.task_id in ids}
        self._ready = [t for t in self._ready if t.task_id not in ids]
        for task_id in dropped:
            gone = self._by_id.pop(task_id, None)
            if gone is not None:
                self._tasks.pop(gone.itt, None)
            running.discard(task_id)
        if running:
            self._waiters.append(_Waiter(running, respond))
        else:
            respond()

    def _task_ended(self, task_id: int) -> None:
        for waiter in list(self._waiters):
            waiter.task_ids.discard(task_id)
            if not waiter.task_ids:
                self._waiters.remove(waiter)
                if not self.closed:
                    waiter.respond()

    def _text(self, pdu: Pdu) -> None:
        if len(self._text_buf) + len(pdu.data) > _LOGIN_MAX_TEXT:
            self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
            self._close("text request too long")
            return
        self._text_buf += pdu.data
        rsp = Pdu.new(PduOpcode.TEXT_RESPONSE, flags=0x80)
        rsp.set_u32(16, pdu.itt)
        rsp.set_u32(20, RESERVED_TAG)
        if pdu.flags & 0x40:  # continued: answer empty, with a TTT so the initiator goes on
            rsp.bhs[1] = 0
            rsp.set_u32(20, 1)
            self._send(rsp)
            return
        text, self._text_buf = bytes(self._text_buf), bytearray()
        try:
            pairs = parse_text(text)
        except TextError:
            self._reject(RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
            return
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                if (value == "All" and self.session_type == "Discovery") or value in ("", self.config.target_name):
                    answer.append(("TargetName", self.config.target_name))
                    answer.append(("TargetAddress", f"{self.config.portal},{self.config.portal_group_tag}"))
            else:
                answer.append((key, "NotUnderstood"))
        rsp.data = build_text(answer)
        self._send(rsp)

    def _logout(self, pdu: Pdu) -> None:
        reason = pdu.flags & 0x7F
        itt = pdu.itt

        def respond(code: int) -> Callable[[], None]:
            def send() -> None:
                rsp = Pdu.new(PduOpcode.LOGOUT_RESPONSE, flags=0x80)
                rsp.bhs[2] = code
                rsp.set_u32(16, itt)
                self._send(rsp)
                if code == 0:
                    self._close("logout")

            return send

        if reason == 2:
            respond(2)()  # connection recovery is not supported (ERL 0)
            return
        if reason not in (0, 1):
            self._reject(RejectReason.INVALID_PDU_FIELD, bytes(pdu.bhs))
            return
        self._abort(list(self._tasks.values()), respond(0))


class _ProtocolViolation(Exception):
    pass


_COMPARE_AND_WRITE = 0x89
# opcode, flags, response, status, AHS length << 24 | data segment length, reserved 8, ITT, SNACK tag,
# StatSN, ExpCmdSN, MaxCmdSN, ExpDataSN, bidirectional read residual, residual count
# of a SCSI Command (RFC 7143 11.3): flags, LUN, ITT, expected data transfer length, CmdSN, CDB
_SCSI_COMMAND_BHS = struct.Struct(">xB2x4x8sIII4x16s")
_OP_SCSI_COMMAND = int(PduOpcode.SCSI_COMMAND)
_LUN_ZERO = bytes(8)
_SCSI_RESPONSE_BHS = struct.Struct(">BBBBI8xIIIIIIII")

# opcode -> (offset, size) of the TRANSFER LENGTH field of the WRITE and WRITE AND VERIFY commands (SBC-3)
# (not WRITE(6): there a length of 0 means 256 blocks)
_WRITE_LENGTH_FIELD = {0x2A: (7, 2), 0xAA: (6, 4), 0x8A: (10, 4), 0x2E: (7, 2), 0xAE: (6, 4), 0x8E: (10, 4)}


def _with_transfer_length(cdb: bytes, blocks: int) -> bytes:
    at, size = _WRITE_LENGTH_FIELD[cdb[0]]
    out = bytearray(cdb)
    out[at : at + size] = blocks.to_bytes(size, "big")
    return bytes(out)


def _chap_binary(value: str) -> bytes | None:
    """A CHAP binary value: 0x-hex or 0b-base64 (RFC 7143 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except ValueError:
        return None
    return None
