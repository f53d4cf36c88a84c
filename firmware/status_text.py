"""Status as text: what `usbmirror status` prints and the board's serial console shows.

Takes the status dictionary a unit's control socket answers with (the same keys as
`usbmirror status --json`); imports nothing of the units themselves.
"""

from __future__ import annotations

from typing import Any


def _secs(v: object) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.0f} s"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_status(st: dict[str, Any]) -> str:
    who = st.get("unit_uuid") or st.get("name") or "?"
    lines = [f"{st.get('role', 'unit')} unit {who}  (pid {st.get('pid', '?')}, "
             f"up {st.get('uptime_s', 0):.0f} s)"]
    vol = st.get("volume")
    if isinstance(vol, dict):
        lines.append(f"  volume   {vol.get('path')}  {_human(vol.get('size_bytes', 0))}  "
                     f"{vol.get('block_size')}-byte blocks")
    j = st.get("journal")
    if isinstance(j, dict):
        cap, used = j.get("capacity_bytes", 0) or 0, j.get("used_bytes", 0) or 0
        pct = 100.0 * used / cap if cap else 0.0
        lines.append(f"  journal  {_human(used)} of {_human(cap)} used ({pct:.1f}%)  head seq "
                     f"{j.get('head_seq')}  tail seq {j.get('tail_seq')}  durable seq {j.get('durable_seq')}")
        age = j.get("oldest_unconfirmed_age_s")
        lines.append(f"           write cache {j.get('write_cache', st.get('write_cache', '?'))}  "
                     f"oldest unconfirmed record {(f'{age:.1f} s') if age is not None else 'none'}  "
                     f"overflow {'YES' if j.get('overflow') else 'no'}"
                     + (f" ({j.get('dirty_regions')} dirty regions)" if j.get("overflow") else ""))
    for tr in st.get("transports", []) or []:
        lines.append(f"  {'iscsi' if tr.startswith('iscsi') else 'usb':<8} {tr}")
    isc = st.get("iscsi")
    if isinstance(isc, dict):
        lines.append(f"           {isc.get('target')}  chap {'on' if isc.get('chap') else 'off'}  "
                     f"{len(isc.get('sessions') or [])} sessions  logins {isc.get('logins')}  "
                     f"refused {isc.get('logins_refused')}")
        for sess in isc.get("sessions") or []:
            lines.append(f"           session {sess.get('initiator')} from {sess.get('peer')}  "
                         f"{sess.get('phase')}  in flight {sess.get('in_flight')}")
    for r in st.get("remotes", []) or []:
        lines.append(f"  remote   {r.get('address')}  {r.get('state')}  mode {r.get('mode')}  acked seq "
                     f"{r.get('acked_seq')}  lag {_human(r.get('lag_bytes') or 0)}"
                     + ("  DEGRADED (host writes acknowledged without it)" if r.get("degraded") else "")
                     + (f"  last error: {r['last_error']}" if r.get("last_error") else ""))
    for s in st.get("sources", []) or []:
        lines.append(f"  source   {s.get('source_id')}  {s.get('state')}  applied seq {s.get('applied_seq')}"
                     f"  target {s.get('target')}" + (f"  last error: {s['last_error']}" if s.get("last_error") else ""))
        fwd = s.get("forward")
        if isinstance(fwd, dict):
            lag_s = fwd.get("lag_seconds")
            lines.append(f"           forward to {fwd.get('address')}  {fwd.get('state')}  acked seq "
                         f"{fwd.get('acked_seq', '-')}  lag {fwd.get('lag_records', '-')} records, "
                         f"{_human(fwd.get('lag_bytes') or 0)}, "
                         + ("-" if not isinstance(lag_s, (int, float)) else f"{lag_s:.1f} s")
                         + ("  relay journal full: dirty regions " + str(fwd.get("dirty_regions"))
                            if fwd.get("overflow") else "")
                         + (f"  last error: {fwd['last_error']}" if fwd.get("last_error") else ""))
        if s.get("history_size_bytes") is not None:
            npa = s.get("history_newest_point_age_s")
            lines.append(f"           history {_human(s['history_size_bytes'])} of {_human(s.get('history_cap_bytes') or 0)}"
                         f"  covers {_secs(s.get('history_covers_s'))}  newest point "
                         + ("none" if npa is None else f"seq {s['history_newest_point']['seq']}, {npa:.1f} s ago"))
    if st.get("cert_expires"):
        lines.append(f"  tls      certificate valid until {st['cert_expires']}")
    for w in st.get("warnings", []) or []:
        lines.append(f"  WARNING  {w}")
    return "\n".join(lines)
