"""INQUIRY data, VPD pages, mode pages and the other small data-in structures of the block target.

Every format is declared once with `construct` (symmetric for build and parse; these are built a
handful of times per attach, never per I/O), with its offset table in the docstring of the
declaration. `ModeState` is what MODE SENSE reports and MODE SELECT may change; the rules for a
MODE SELECT parameter list (what may change, what is an error) live in `parse_mode_select`.

The builders are pure functions of frozen dataclasses and ints, memoized with `lru_cache`: a host
asking MODE SENSE or INQUIRY again gets the bytes built the first time (construct costs ~0.5 ms a page).

What this module does not do: it never calls the store. The target reads `store.write_cache` and
passes it in, and applies what `parse_mode_select` returns.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any

from construct import (
    Adapter,
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    Flag,
    GreedyRange,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
    this,
)

from firmware.scsi.sense import (
    Asc,
    CommandError,
    illegal_request,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)


class VpdPage(enum.IntEnum):
    SUPPORTED_VPD_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


class ModePage(enum.IntEnum):
    CACHING = 0x08
    CONTROL = 0x0A
    INFORMATIONAL_EXCEPTIONS_CONTROL = 0x1C
    ALL = 0x3F


class PageControl(enum.IntEnum):
    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3  # not supported: SAVING PARAMETERS NOT SUPPORTED


# SPC-4 7.7.3 version descriptors
VERSION_SAM5 = 0x00A0
VERSION_SPC4 = 0x0460
VERSION_SBC3 = 0x04C0


class _Ascii(Adapter):  # type: ignore[misc]
    """Left-aligned ASCII padded with spaces (SPC-4 4.4.1), as INQUIRY identification fields are."""

    def __init__(self, length: int) -> None:
        super().__init__(Bytes(length))
        self.length = length

    def _decode(self, obj: bytes, context: Any, path: Any) -> str:
        return obj.decode("ascii").rstrip(" ")

    def _encode(self, obj: str, context: Any, path: Any) -> bytes:
        raw = obj.encode("ascii")
        if len(raw) > self.length:
            raise ValueError(f"{obj!r} is longer than {self.length} bytes")
        return raw.ljust(self.length, b" ")


def check_ascii_field(name: str, value: str, length: int) -> None:
    """Configuration check for INQUIRY identification strings: printable ASCII, fits the field."""
    if len(value) > length or any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"{name} must be at most {length} printable ASCII characters: {value!r}")


# ---- INQUIRY ----------------------------------------------------------------------------------

STANDARD_INQUIRY = Struct(
    # offset 0: peripheral qualifier (7-5) | device type (4-0)   1: RMB (7)   2: VERSION
    # 3: NORMACA (5) HISUP (4) RESPONSE DATA FORMAT (3-0)   4: ADDITIONAL LENGTH (n-4)
    # 5-7: SCCS/ACC/TPGS/3PC/PROTECT, ENCSERV/MULTIP, CMDQUE   8: vendor (8)  16: product (16)
    # 32: revision (4)   36: vendor specific (20)   56-57: reserved   58: version descriptors (8 x 2)
    # 74-95: reserved
    "peripheral" / BitStruct("qualifier" / BitsInteger(3), "device_type" / BitsInteger(5)),
    "removable" / BitStruct("rmb" / Flag, "lu_cong" / Flag, Padding(6)),
    "version" / Int8ub,
    "format" / BitStruct(Padding(2), "normaca" / Flag, "hisup" / Flag, "response_data_format" / BitsInteger(4)),
    "additional_length" / Int8ub,
    "byte5" / Int8ub,
    "byte6" / Int8ub,
    "byte7" / Int8ub,
    "vendor" / _Ascii(8),
    "product" / _Ascii(16),
    "revision" / _Ascii(4),
    "vendor_specific" / _Ascii(20),
    Padding(2),
    "version_descriptors" / Array(8, Int16ub),
    Padding(22),
)
STANDARD_INQUIRY_LENGTH = 96

VPD_PAGE = Struct(
    # 0: peripheral qualifier | device type   1: PAGE CODE   2: PAGE LENGTH (n-3)   4: page payload
    "peripheral" / Int8ub,
    "page_code" / Int8ub,
    "page_length" / Int16ub,
    "payload" / Bytes(this.page_length),
)

DESIGNATION_DESCRIPTOR = Struct(
    # 0: PROTOCOL IDENTIFIER (7-4) | CODE SET (3-0)   1: PIV (7) | ASSOCIATION (5-4) | TYPE (3-0)
    # 2: reserved   3: DESIGNATOR LENGTH   4: designator
    "b0" / BitStruct("protocol_identifier" / BitsInteger(4), "code_set" / BitsInteger(4)),
    "b1" / BitStruct("piv" / Flag, Padding(1), "association" / BitsInteger(2), "designator_type" / BitsInteger(4)),
    Padding(1),
    "designator_length" / Int8ub,
    "designator" / Bytes(this.designator_length),
)
DESIGNATION_DESCRIPTORS = GreedyRange(DESIGNATION_DESCRIPTOR)

CODE_SET_BINARY = 1
CODE_SET_ASCII = 2
DESIGNATOR_T10_VENDOR_ID = 1
DESIGNATOR_EUI64 = 2
DESIGNATOR_NAA = 3

BLOCK_LIMITS = Struct(
    # payload of VPD 0xB0 (SBC-3 6.5.3), page offsets: 4: WSNZ (bit 0)   5: MAX COMPARE AND WRITE
    # 6: OPTIMAL TRANSFER LENGTH GRANULARITY   8: MAXIMUM TRANSFER LENGTH   12: OPTIMAL TRANSFER LENGTH
    # 16: MAX PREFETCH   20: MAX UNMAP LBA COUNT   24: MAX UNMAP BLOCK DESCRIPTOR COUNT
    # 28: OPTIMAL UNMAP GRANULARITY   32: UGAVALID (bit 31) | UNMAP GRANULARITY ALIGNMENT
    # 36: MAXIMUM WRITE SAME LENGTH (8)   44-63: reserved
    "wsnz" / BitStruct(Padding(7), "wsnz" / Flag),
    "max_compare_and_write_length" / Int8ub,
    "optimal_transfer_length_granularity" / Int16ub,
    "maximum_transfer_length" / Int32ub,
    "optimal_transfer_length" / Int32ub,
    "maximum_prefetch_length" / Int32ub,
    "maximum_unmap_lba_count" / Int32ub,
    "maximum_unmap_block_descriptor_count" / Int32ub,
    "optimal_unmap_granularity" / Int32ub,
    "unmap_granularity_alignment" / Int32ub,
    "maximum_write_same_length" / Int64ub,
    Padding(20),
)

BLOCK_DEVICE_CHARACTERISTICS = Struct(
    # payload of VPD 0xB1 (SBC-3 6.5.2), page offsets: 4: MEDIUM ROTATION RATE (1 = non-rotating)
    # 6: PRODUCT TYPE   7: WABEREQ/WACEREQ | NOMINAL FORM FACTOR   8: FUAB | VBULS   9-63 reserved
    "medium_rotation_rate" / Int16ub,
    "product_type" / Int8ub,
    "form" / BitStruct("wabereq" / BitsInteger(2), "wacereq" / BitsInteger(2), "nominal_form_factor" / BitsInteger(4)),
    "b8" / BitStruct(Padding(6), "fuab" / Flag, "vbuls" / Flag),
    Padding(55),
)

LOGICAL_BLOCK_PROVISIONING = Struct(
    # payload of VPD 0xB2 (SBC-3 6.5.4 / SBC-4 LBPRZ field), page offsets: 4: THRESHOLD EXPONENT
    # 5: LBPU (7) LBPWS (6) LBPWS10 (5) LBPRZ (4-2) ANC_SUP (1) DP (0)
    # 6: MINIMUM PERCENTAGE (7-3) | PROVISIONING TYPE (2-0)   7: THRESHOLD PERCENTAGE
    "threshold_exponent" / Int8ub,
    "flags"
    / BitStruct("lbpu" / Flag, "lbpws" / Flag, "lbpws10" / Flag, "lbprz" / BitsInteger(3), "anc_sup" / Flag, "dp" / Flag),
    "b6" / BitStruct("minimum_percentage" / BitsInteger(5), "provisioning_type" / BitsInteger(3)),
    "threshold_percentage" / Int8ub,
)
PROVISIONING_TYPE_THIN = 2


@dataclass(frozen=True, slots=True)
class InquiryIdentity:
    """What the unit says about itself in INQUIRY and the identification VPD pages."""

    vendor: str  # 8 ASCII
    product: str  # 16 ASCII
    revision: str  # 4 ASCII
    serial: str  # ASCII, VPD 0x80 and the T10 vendor id designator
    device_id: bytes  # 8 or 16 bytes: NAA or EUI-64 designator (see `device_id_designator`)

    def validate(self) -> None:
        check_ascii_field("vendor", self.vendor, 8)
        check_ascii_field("product", self.product, 16)
        check_ascii_field("revision", self.revision, 4)
        check_ascii_field("serial", self.serial, 200)
        if not self.serial:
            raise ValueError("serial must not be empty")
        if len(self.device_id) not in (8, 16):
            raise ValueError(f"device_id must be 8 or 16 bytes, not {len(self.device_id)}")


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """The numbers of the Block Limits VPD page, in logical blocks."""

    max_transfer_blocks: int
    optimal_granularity_blocks: int
    max_unmap_blocks: int
    max_unmap_descriptors: int
    max_write_same_blocks: int
    max_compare_blocks: int = 0  # COMPARE AND WRITE, at most 255


@functools.lru_cache(maxsize=16)
def standard_inquiry(ident: InquiryIdentity) -> bytes:
    return bytes(
        STANDARD_INQUIRY.build(
            {
                "peripheral": {"qualifier": 0, "device_type": 0},  # connected direct-access block device
                # RMB=0: a fixed disk. See docs/SCSI.md: hosts poll removable media, give them
                # "quick removal" policies and refuse some server uses; a mirrored disk is fixed.
                "removable": {"rmb": False, "lu_cong": False},
                "version": 0x06,  # SPC-4
                "format": {"normaca": False, "hisup": True, "response_data_format": 2},
                "additional_length": STANDARD_INQUIRY_LENGTH - 5,
                "byte5": 0,  # no PROTECT, no 3PC, no TPGS
                "byte6": 0,
                "byte7": 0,  # CMDQUE=0: BOT carries one command at a time
                "vendor": ident.vendor,
                "product": ident.product,
                "revision": ident.revision,
                "vendor_specific": "",
                "version_descriptors": [VERSION_SAM5, VERSION_SPC4, VERSION_SBC3, 0, 0, 0, 0, 0],
            }
        )
    )


def device_id_designator(device_id: bytes) -> tuple[int, bytes]:
    """(designator type, designator) for the unit's binary identifier.

    An 8-byte id whose first nibble is an 8-byte NAA format (2 IEEE extended, 3 locally assigned,
    5 IEEE registered) or a 16-byte id starting with NAA 6 (IEEE registered extended) is served as an
    NAA designator, anything else as EUI-64 (8 bytes) or EUI-64 based 16-byte. `naa_locally_assigned`
    makes a valid NAA 3 id from any unit UUID.
    """
    naa = device_id[0] >> 4
    if (len(device_id) == 8 and naa in (2, 3, 5)) or (len(device_id) == 16 and naa == 6):
        return DESIGNATOR_NAA, device_id
    return DESIGNATOR_EUI64, device_id


def naa_locally_assigned(unit_id: bytes) -> bytes:
    """An 8-byte NAA 3 (locally assigned, SPC-4 7.8.6.6.3) identifier from the low 60 bits of `unit_id`
    (e.g. `uuid.UUID(...).bytes`)."""
    value = int.from_bytes(unit_id, "big") & ((1 << 60) - 1)
    return ((0x3 << 60) | value).to_bytes(8, "big")


def _vpd(page: int, payload: bytes) -> bytes:
    return bytes(VPD_PAGE.build({"peripheral": 0, "page_code": page, "page_length": len(payload), "payload": payload}))


def _designator(code_set: int, dtype: int, value: bytes) -> dict[str, Any]:
    return {
        "b0": {"protocol_identifier": 0, "code_set": code_set},
        "b1": {"piv": False, "association": 0, "designator_type": dtype},  # association 0: the LU
        "designator_length": len(value),
        "designator": value,
    }


@functools.lru_cache(maxsize=64)
def vpd_page(page: int, ident: InquiryIdentity, limits: BlockLimits) -> bytes:
    """One VPD page, or CommandError INVALID FIELD IN CDB (byte 2) for a page not served."""
    if page == VpdPage.SUPPORTED_VPD_PAGES:
        return _vpd(page, bytes(sorted(VpdPage)))
    if page == VpdPage.UNIT_SERIAL_NUMBER:
        return _vpd(page, ident.serial.encode("ascii"))
    if page == VpdPage.DEVICE_IDENTIFICATION:
        dtype, value = device_id_designator(ident.device_id)
        t10 = ident.vendor.encode("ascii").ljust(8, b" ") + ident.serial.encode("ascii")
        descriptors = [
            _designator(CODE_SET_BINARY, dtype, value),
            _designator(CODE_SET_ASCII, DESIGNATOR_T10_VENDOR_ID, t10),
        ]
        return _vpd(page, bytes(DESIGNATION_DESCRIPTORS.build(descriptors)))
    if page == VpdPage.BLOCK_LIMITS:
        payload = BLOCK_LIMITS.build(
            {
                "wsnz": {"wsnz": True},
                "max_compare_and_write_length": limits.max_compare_blocks,
                "optimal_transfer_length_granularity": limits.optimal_granularity_blocks,
                "maximum_transfer_length": limits.max_transfer_blocks,
                "optimal_transfer_length": limits.max_transfer_blocks,
                "maximum_prefetch_length": 0,
                "maximum_unmap_lba_count": limits.max_unmap_blocks,
                "maximum_unmap_block_descriptor_count": limits.max_unmap_descriptors,
                "optimal_unmap_granularity": limits.optimal_granularity_blocks,
                "unmap_granularity_alignment": 0,
                "maximum_write_same_length": limits.max_write_same_blocks,
            }
        )
        return _vpd(page, bytes(payload))
    if page == VpdPage.BLOCK_DEVICE_CHARACTERISTICS:
        payload = BLOCK_DEVICE_CHARACTERISTICS.build(
            {
                "medium_rotation_rate": 1,  # non-rotating medium: hosts skip rotational heuristics
                "product_type": 0,
                "form": {"wabereq": 0, "wacereq": 0, "nominal_form_factor": 0},
                "b8": {"fuab": False, "vbuls": False},
            }
        )
        return _vpd(page, bytes(payload))
    if page == VpdPage.LOGICAL_BLOCK_PROVISIONING:
        payload = LOGICAL_BLOCK_PROVISIONING.build(
            {
                "threshold_exponent": 0,
                "flags": {
                    "lbpu": True,  # UNMAP
                    "lbpws": True,  # WRITE SAME(16) with UNMAP
                    "lbpws10": True,  # WRITE SAME(10) with UNMAP
                    "lbprz": 1,  # unmapped blocks read as zeros
                    "anc_sup": False,
                    "dp": False,
                },
                "b6": {"minimum_percentage": 0, "provisioning_type": PROVISIONING_TYPE_THIN},
                "threshold_percentage": 0,
            }
        )
        return _vpd(page, bytes(payload))
    raise CommandError(invalid_field_in_cdb(2))


# ---- mode pages -------------------------------------------------------------------------------

_PAGE_HEADER = BitStruct("ps" / Flag, "spf" / Flag, "page_code" / BitsInteger(6))

CACHING_PAGE = Struct(
    # SBC-3 6.4.5, 20 bytes: 0: PS|SPF|0x08  1: 0x12  2: IC ABPF CAP DISC SIZE WCE MF RCD
    # 3: retention priorities  4: DISABLE PRE-FETCH TRANSFER LENGTH  6: MIN PRE-FETCH  8: MAX PRE-FETCH
    # 10: MAX PRE-FETCH CEILING  12: FSW LBCSS DRA VS(2) reserved(2) NV_DIS  13: NUMBER OF CACHE SEGMENTS
    # 14: CACHE SEGMENT SIZE  16: reserved  17-19: obsolete
    "header" / _PAGE_HEADER,
    "page_length" / Int8ub,
    "flags"
    / BitStruct(
        "ic" / Flag, "abpf" / Flag, "cap" / Flag, "disc" / Flag, "size" / Flag, "wce" / Flag, "mf" / Flag, "rcd" / Flag
    ),
    "retention_priorities" / Int8ub,
    "disable_prefetch_transfer_length" / Int16ub,
    "minimum_prefetch" / Int16ub,
    "maximum_prefetch" / Int16ub,
    "maximum_prefetch_ceiling" / Int16ub,
    "flags12" / BitStruct("fsw" / Flag, "lbcss" / Flag, "dra" / Flag, "vs" / BitsInteger(2), Padding(2), "nv_dis" / Flag),
    "number_of_cache_segments" / Int8ub,
    "cache_segment_size" / Int16ub,
    Padding(4),
)

CONTROL_PAGE = Struct(
    # SPC-4 7.5.8, 12 bytes: 0: PS|SPF|0x0A  1: 0x0A  2: TST(3) TMF_ONLY DPICZ D_SENSE GLTSD RLEC
    # 3: QUEUE ALGORITHM MODIFIER(4) NUAR QERR(2) obsolete  4: VS RAC UA_INTLCK_CTRL(2) SWP obsolete(3)
    # 5: ATO TAS ATMPE RWWP reserved AUTOLOAD MODE(3)  6-7: obsolete  8: BUSY TIMEOUT PERIOD
    # 10: EXTENDED SELF-TEST COMPLETION TIME
    "header" / _PAGE_HEADER,
    "page_length" / Int8ub,
    "b2"
    / BitStruct("tst" / BitsInteger(3), "tmf_only" / Flag, "dpicz" / Flag, "d_sense" / Flag, "gltsd" / Flag, "rlec" / Flag),
    "b3" / BitStruct("queue_algorithm_modifier" / BitsInteger(4), "nuar" / Flag, "qerr" / BitsInteger(2), Padding(1)),
    "b4" / BitStruct("vs" / Flag, "rac" / Flag, "ua_intlck_ctrl" / BitsInteger(2), "swp" / Flag, Padding(3)),
    "b5"
    / BitStruct("ato" / Flag, "tas" / Flag, "atmpe" / Flag, "rwwp" / Flag, Padding(1), "autoload_mode" / BitsInteger(3)),
    Padding(2),
    "busy_timeout_period" / Int16ub,
    "extended_self_test_completion_time" / Int16ub,
)

INFORMATIONAL_EXCEPTIONS_PAGE = Struct(
    # SPC-4 7.5.14 (page 0x1C), 12 bytes: 0: PS|SPF|0x1C  1: 0x0A
    # 2: PERF reserved EBF EWASC DEXCPT TEST EBACKERR LOGERR  3: reserved(4) MRIE(4)
    # 4: INTERVAL TIMER  8: REPORT COUNT
    "header" / _PAGE_HEADER,
    "page_length" / Int8ub,
    "b2"
    / BitStruct(
        "perf" / Flag,
        Padding(1),
        "ebf" / Flag,
        "ewasc" / Flag,
        "dexcpt" / Flag,
        "test" / Flag,
        "ebackerr" / Flag,
        "logerr" / Flag,
    ),
    "b3" / BitStruct(Padding(4), "mrie" / BitsInteger(4)),
    "interval_timer" / Int32ub,
    "report_count" / Int32ub,
)

MODE_HEADER_6 = Struct(
    # 0: MODE DATA LENGTH (n-1)  1: MEDIUM TYPE  2: DEVICE-SPECIFIC PARAMETER (WP 7, DPOFUA 4)
    # 3: BLOCK DESCRIPTOR LENGTH
    "mode_data_length" / Int8ub,
    "medium_type" / Int8ub,
    "device_specific" / Int8ub,
    "block_descriptor_length" / Int8ub,
)
MODE_HEADER_10 = Struct(
    # 0: MODE DATA LENGTH (n-2)  2: MEDIUM TYPE  3: DEVICE-SPECIFIC  4: LONGLBA (bit 0)  5: reserved
    # 6: BLOCK DESCRIPTOR LENGTH
    "mode_data_length" / Int16ub,
    "medium_type" / Int8ub,
    "device_specific" / Int8ub,
    "longlba" / Int8ub,
    Padding(1),
    "block_descriptor_length" / Int16ub,
)
SHORT_BLOCK_DESCRIPTOR = Struct(
    # SBC-3 6.4.2.2: 0: NUMBER OF LOGICAL BLOCKS (FFFFFFFFh when larger)  4: reserved  5: LOGICAL BLOCK LENGTH
    "number_of_blocks" / Int32ub,
    Padding(1),
    "block_length" / Int24ub,
)
LONG_BLOCK_DESCRIPTOR = Struct(
    # SBC-3 6.4.2.3: 0: NUMBER OF LOGICAL BLOCKS (8)  8: reserved (4)  12: LOGICAL BLOCK LENGTH
    "number_of_blocks" / Int64ub,
    Padding(4),
    "block_length" / Int32ub,
)

DEVICE_SPECIFIC_WP = 0x80
DEVICE_SPECIFIC_DPOFUA = 0x10


@dataclass(frozen=True, slots=True)
class ModeState:
    """Mode parameters of the unit: `wce` is read from the store each time (the truth)."""

    wce: bool
    default_wce: bool
    read_only: bool
    block_size: int
    num_blocks: int


def _caching_page(wce: bool) -> bytes:
    return bytes(
        CACHING_PAGE.build(
            {
                "header": {"ps": False, "spf": False, "page_code": ModePage.CACHING},
                "page_length": 0x12,
                "flags": {
                    "ic": False,
                    "abpf": False,
                    "cap": False,
                    "disc": False,
                    "size": False,
                    "wce": wce,
                    "mf": False,
                    "rcd": False,
                },
                "retention_priorities": 0,
                "disable_prefetch_transfer_length": 0,
                "minimum_prefetch": 0,
                "maximum_prefetch": 0,
                "maximum_prefetch_ceiling": 0,
                "flags12": {"fsw": False, "lbcss": False, "dra": False, "vs": 0, "nv_dis": False},
                "number_of_cache_segments": 0,
                "cache_segment_size": 0,
            }
        )
    )


def _control_page(current: bool) -> bytes:
    # Changeable mask: nothing in the control page is changeable; current = default.
    return bytes(
        CONTROL_PAGE.build(
            {
                "header": {"ps": False, "spf": False, "page_code": ModePage.CONTROL},
                "page_length": 0x0A,
                "b2": {
                    "tst": 0,
                    "tmf_only": False,
                    "dpicz": False,
                    "d_sense": False,  # fixed-format sense only
                    "gltsd": current,  # no log parameters are saved
                    "rlec": False,
                },
                "b3": {"queue_algorithm_modifier": 0, "nuar": False, "qerr": 0},
                "b4": {"vs": False, "rac": False, "ua_intlck_ctrl": 0, "swp": False},
                "b5": {"ato": False, "tas": False, "atmpe": False, "rwwp": False, "autoload_mode": 0},
                "busy_timeout_period": 0,
                "extended_self_test_completion_time": 0,
            }
        )
    )


def _ie_page(current: bool) -> bytes:
    return bytes(
        INFORMATIONAL_EXCEPTIONS_PAGE.build(
            {
                "header": {"ps": False, "spf": False, "page_code": ModePage.INFORMATIONAL_EXCEPTIONS_CONTROL},
                "page_length": 0x0A,
                "b2": {
                    "perf": False,
                    "ebf": False,
                    "ewasc": False,
                    "dexcpt": current,  # no informational exceptions are reported
                    "test": False,
                    "ebackerr": False,
                    "logerr": False,
                },
                "b3": {"mrie": 0},
                "interval_timer": 0,
                "report_count": 0,
            }
        )
    )


@functools.lru_cache(maxsize=64)
def mode_page(page: int, pc: int, state: ModeState) -> bytes:
    """One mode page for a page control value (0 current, 1 changeable mask, 2 default)."""
    if page == ModePage.CACHING:
        if pc == PageControl.CHANGEABLE:
            return _caching_page(wce=True)  # WCE is the only changeable field
        return _caching_page(state.default_wce if pc == PageControl.DEFAULT else state.wce)
    if page == ModePage.CONTROL:
        return _control_page(pc != PageControl.CHANGEABLE)
    if page == ModePage.INFORMATIONAL_EXCEPTIONS_CONTROL:
        return _ie_page(pc != PageControl.CHANGEABLE)
    raise KeyError(page)


SERVED_MODE_PAGES = (ModePage.CACHING, ModePage.CONTROL, ModePage.INFORMATIONAL_EXCEPTIONS_CONTROL)
_PAGE_LENGTH = {page: len(mode_page(page, 0, ModeState(False, False, False, 512, 1))) for page in SERVED_MODE_PAGES}


def _block_descriptor(state: ModeState, long_lba: bool, pc: int) -> bytes:
    changeable = pc == PageControl.CHANGEABLE  # no field of the block descriptor can be changed
    if long_lba:
        return bytes(
            LONG_BLOCK_DESCRIPTOR.build(
                {
                    "number_of_blocks": 0 if changeable else state.num_blocks,
                    "block_length": 0 if changeable else state.block_size,
                }
            )
        )
    return bytes(
        SHORT_BLOCK_DESCRIPTOR.build(
            {
                "number_of_blocks": 0 if changeable else min(state.num_blocks, 0xFFFFFFFF),
                "block_length": 0 if changeable else state.block_size,
            }
        )
    )


@functools.lru_cache(maxsize=256)
def mode_sense_data(
    *, long_header: bool, pc: int, page: int, subpage: int, dbd: bool, llbaa: bool, state: ModeState
) -> bytes:
    """The whole MODE SENSE (6)/(10) response, untruncated (the caller cuts to the allocation length)."""
    if subpage == 0xFF and page == ModePage.ALL:
        pass  # all pages and subpages: this unit has no subpages, so the same as subpage 0
    elif subpage != 0:
        raise CommandError(invalid_field_in_cdb(3))
    if page == ModePage.ALL:
        pages = b"".join(mode_page(p, pc, state) for p in SERVED_MODE_PAGES)
    elif page in SERVED_MODE_PAGES:
        pages = mode_page(page, pc, state)
    else:
        raise CommandError(invalid_field_in_cdb(2, 5))
    descriptor = b"" if dbd else _block_descriptor(state, long_header and llbaa, pc)
    device_specific = DEVICE_SPECIFIC_DPOFUA | (DEVICE_SPECIFIC_WP if state.read_only else 0)
    if long_header:
        header = MODE_HEADER_10.build(
            {
                "mode_data_length": 6 + len(descriptor) + len(pages),
                "medium_type": 0,
                "device_specific": device_specific,
                "longlba": 1 if len(descriptor) == 16 else 0,
                "block_descriptor_length": len(descriptor),
            }
        )
    else:
        header = MODE_HEADER_6.build(
            {
                "mode_data_length": 3 + len(descriptor) + len(pages),
                "medium_type": 0,
                "device_specific": device_specific,
                "block_descriptor_length": len(descriptor),
            }
        )
    return bytes(header) + descriptor + pages


@dataclass(frozen=True, slots=True)
class ModeChanges:
    """What a valid MODE SELECT parameter list asks for (None: field not in the list)."""

    wce: bool | None = None


def parse_mode_select(data: bytes, *, long_header: bool, state: ModeState) -> ModeChanges:
    """Validate a MODE SELECT parameter list against the current values and the changeable masks.

    Every error names the offending byte of the parameter list:
    - shorter than its header, or a page cut short: PARAMETER LIST LENGTH ERROR;
    - a reserved header field set, a block descriptor that would change capacity or block size,
      an unknown page, a wrong page length, PS/SPF set, a change to a field that is not
      changeable: INVALID FIELD IN PARAMETER LIST.
    Nothing is applied unless the whole list is valid.
    """
    if not data:
        return ModeChanges()  # SPC-4 6.11: an empty parameter list is not an error
    header_len = 8 if long_header else 4
    if len(data) < header_len:
        raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
    if long_header:
        hdr = MODE_HEADER_10.parse(data)
        if data[0] or data[1]:  # MODE DATA LENGTH is reserved in MODE SELECT
            raise CommandError(invalid_field_in_parameter_list(0 if data[0] else 1))
        if data[4] & 0xFE:
            raise CommandError(invalid_field_in_parameter_list(4, (data[4] & 0xFE).bit_length() - 1))
        if data[5]:
            raise CommandError(invalid_field_in_parameter_list(5))
        medium_at, ds_at, bdl_at = 2, 3, 6
    else:
        hdr = MODE_HEADER_6.parse(data)
        if data[0]:
            raise CommandError(invalid_field_in_parameter_list(0))
        medium_at, ds_at, bdl_at = 1, 2, 3
    if hdr.medium_type != 0:
        raise CommandError(invalid_field_in_parameter_list(medium_at))
    # Hosts echo what MODE SENSE returned: WP and DPOFUA are ignored here, anything else is reserved.
    stray = hdr.device_specific & ~(DEVICE_SPECIFIC_WP | DEVICE_SPECIFIC_DPOFUA) & 0xFF
    if stray:
        raise CommandError(invalid_field_in_parameter_list(ds_at, stray.bit_length() - 1))
    bdl = hdr.block_descriptor_length
    long_lba = long_header and bool(hdr.longlba)
    if bdl not in (0, 16 if long_lba else 8):
        raise CommandError(invalid_field_in_parameter_list(bdl_at))
    offset = header_len
    if bdl:
        if len(data) < offset + bdl:
            raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
        _check_block_descriptor(data, offset, long_lba, state)
        offset += bdl
    wce: bool | None = None
    while offset < len(data):
        start = offset
        if len(data) - start < 2:
            raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
        code = data[start] & 0x3F
        if data[start] & 0xC0:  # PS is reserved in MODE SELECT; SPF: no subpages here
            raise CommandError(invalid_field_in_parameter_list(start, (data[start] & 0xC0).bit_length() - 1))
        if code not in SERVED_MODE_PAGES:
            raise CommandError(invalid_field_in_parameter_list(start, 5))
        length = _PAGE_LENGTH[ModePage(code)]
        if data[start + 1] != length - 2:
            raise CommandError(invalid_field_in_parameter_list(start + 1))
        if len(data) - start < length:
            raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
        new = data[start : start + length]
        current = mode_page(code, PageControl.CURRENT, state)
        changeable = mode_page(code, PageControl.CHANGEABLE, state)
        for i in range(2, length):
            bad = (new[i] ^ current[i]) & ~changeable[i] & 0xFF
            if bad:
                raise CommandError(invalid_field_in_parameter_list(start + i, bad.bit_length() - 1))
        if code == ModePage.CACHING:
            wce = bool(CACHING_PAGE.parse(new).flags.wce)
        offset += length
    return ModeChanges(wce=wce)


def _check_block_descriptor(data: bytes, offset: int, long_lba: bool, state: ModeState) -> None:
    # Capacity and block size are fixed: a descriptor may repeat them (or give 0 blocks: no change).
    if long_lba:
        desc = LONG_BLOCK_DESCRIPTOR.parse(data[offset : offset + 16])
        blocks_ok = desc.number_of_blocks in (0, state.num_blocks)
        if any(data[offset + 8 : offset + 12]):
            raise CommandError(invalid_field_in_parameter_list(offset + 8))
        length_at = offset + 12
    else:
        desc = SHORT_BLOCK_DESCRIPTOR.parse(data[offset : offset + 8])
        blocks_ok = desc.number_of_blocks in (0, min(state.num_blocks, 0xFFFFFFFF))
        if data[offset + 4]:
            raise CommandError(invalid_field_in_parameter_list(offset + 4))
        length_at = offset + 5
    if not blocks_ok:
        raise CommandError(invalid_field_in_parameter_list(offset))
    if desc.block_length != state.block_size:
        raise CommandError(invalid_field_in_parameter_list(length_at))


# ---- capacity and LUN data --------------------------------------------------------------------

READ_CAPACITY_10_DATA = Struct(
    # SBC-3 5.16.2: 0: RETURNED LOGICAL BLOCK ADDRESS (FFFFFFFFh: use READ CAPACITY(16))  4: BLOCK LENGTH
    "returned_lba" / Int32ub,
    "block_length" / Int32ub,
)

READ_CAPACITY_16_DATA = Struct(
    # SBC-3 5.16.2: 0: RETURNED LOGICAL BLOCK ADDRESS (8)  8: LOGICAL BLOCK LENGTH
    # 12: reserved(4) P_TYPE(3) PROT_EN  13: P_I_EXPONENT(4) LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT(4)
    # 14: LBPME (15) LBPRZ (14) LOWEST ALIGNED LBA (13-0)  16-31: reserved
    "returned_lba" / Int64ub,
    "block_length" / Int32ub,
    "protection" / Int8ub,
    "exponents" / BitStruct("p_i_exponent" / BitsInteger(4), "lbppbe" / BitsInteger(4)),
    "provisioning" / BitStruct("lbpme" / Flag, "lbprz" / Flag, "lowest_aligned_lba" / BitsInteger(14)),
    Padding(16),
)

FORMAT_CAPACITY_LIST = Struct(
    # MMC-6 / UFI READ FORMAT CAPACITIES: 0-2 reserved  3: CAPACITY LIST LENGTH (8)
    # 4: NUMBER OF BLOCKS  8: DESCRIPTOR TYPE (2 = formatted media)  9: BLOCK LENGTH (3)
    Padding(3),
    "capacity_list_length" / Int8ub,
    "number_of_blocks" / Int32ub,
    "descriptor_type" / Int8ub,
    "block_length" / Int24ub,
)
FORMATTED_MEDIA = 0x02

REPORT_LUNS_DATA = Struct(
    # SPC-4 6.33: 0: LUN LIST LENGTH  4: reserved  8: LUN entries (8 bytes each)
    "lun_list_length" / Int32ub,
    Padding(4),
    "luns" / Array(this.lun_list_length // 8, Bytes(8)),
)


def read_capacity_10(num_blocks: int, block_size: int) -> bytes:
    last = num_blocks - 1
    returned = 0xFFFFFFFF if last >= 0xFFFFFFFF else last
    return bytes(READ_CAPACITY_10_DATA.build({"returned_lba": returned, "block_length": block_size}))


def read_capacity_16(num_blocks: int, block_size: int) -> bytes:
    return bytes(
        READ_CAPACITY_16_DATA.build(
            {
                "returned_lba": num_blocks - 1,
                "block_length": block_size,
                "protection": 0,
                "exponents": {"p_i_exponent": 0, "lbppbe": 0},
                "provisioning": {"lbpme": True, "lbprz": True, "lowest_aligned_lba": 0},
            }
        )
    )


def format_capacities(num_blocks: int, block_size: int) -> bytes:
    return bytes(
        FORMAT_CAPACITY_LIST.build(
            {
                "capacity_list_length": 8,
                "number_of_blocks": min(num_blocks, 0xFFFFFFFF),
                "descriptor_type": FORMATTED_MEDIA,
                "block_length": block_size,
            }
        )
    )


def report_luns(select_report: int) -> bytes:
    luns = [] if select_report == 0x01 else [bytes(8)]  # 0x01: well-known LUs only; this unit has none
    return bytes(REPORT_LUNS_DATA.build({"lun_list_length": 8 * len(luns), "luns": luns}))
