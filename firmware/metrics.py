"""Prometheus metrics (`--metrics HOST:PORT`): `GET /metrics` in the Prometheus text format.

`StatusCollector` builds every sample at scrape time from the unit's `status()` dict (the same one
`usbmirror status --json` prints) and, on a local unit, from `firmware.monitor.CommandMonitor`
(latency histograms per SCSI opcode). Nothing is counted twice and the daemons need no metric
objects of their own. `MetricsServer` (a context manager) serves it with `prometheus_client`.
Names and alert rules: `docs/OPERATIONS.md`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import start_wsgi_server
from prometheus_client.registry import Collector

from firmware.monitor import LATENCY_BUCKETS_S, CommandMonitor

log = logging.getLogger(__name__)

P = "usbmirror_"
LINK_STATES = ("streaming", "resyncing", "connecting", "disconnected", "refused", "target_error", "stopped")


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]], monitor: CommandMonitor | None = None) -> None:
        self.status = status
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        try:
            st = self.status()
        except Exception as exc:  # a scrape must not take the unit down; the gap shows in `up`
            log.warning("metrics: status failed: %s", exc)
            st = {}
        g = GaugeMetricFamily(P + "up", "1 while the unit answers its status", value=1.0 if st else 0.0)
        yield g
        yield from self._journal(st)
        yield from self._remotes(st.get("remotes") or [])
        yield from self._sources(st.get("sources") or [])
        yield from self._scsi(st.get("scsi") or {})
        if self.monitor is not None:
            yield from self._latency(self.monitor)
        warn = st.get("warnings")
        if isinstance(warn, list):
            yield GaugeMetricFamily(P + "warnings", "warnings in the unit's status (certificate expiry, ...)",
                                    value=float(len(warn)))
        if "refused_connections" in st:
            yield CounterMetricFamily(P + "refused_connections", "connections refused by the remote unit",
                                      value=float(st["refused_connections"] or 0))

    def _journal(self, st: dict[str, Any]) -> Iterator[Metric]:
        j = st.get("journal")
        if not isinstance(j, dict):
            return
        for key, name, doc in (("used_bytes", "journal_used_bytes", "bytes the journal holds"),
                               ("capacity_bytes", "journal_capacity_bytes", "bytes the journal can hold"),
                               ("fill", "journal_fill_ratio", "used / capacity"),
                               ("head_seq", "journal_head_seq", "newest record"),
                               ("dirty_regions", "overflow_dirty_regions", "regions to resync after an overflow"),
                               ("oldest_unconfirmed_age_s", "journal_oldest_unconfirmed_age_seconds",
                                "age of the oldest record a remote has not confirmed")):
            v = _num(j.get(key))
            if v is not None:
                yield GaugeMetricFamily(P + name, doc, value=v)
        yield GaugeMetricFamily(P + "overflow", "1 while the journal is full and dirty regions are tracked",
                                value=1.0 if j.get("overflow") else 0.0)
        yield CounterMetricFamily(P + "overflow_events", "times the journal overflowed",
                                  value=float(j.get("overflow_events") or 0))
        if "volume_full" in st:
            yield GaugeMetricFamily(P + "volume_full", "1 while the local volume's file system is full",
                                    value=1.0 if st["volume_full"] else 0.0)
            yield CounterMetricFamily(P + "volume_full_events", "times the local volume ran out of space",
                                      value=float(st.get("volume_full_events") or 0))

    def _remotes(self, remotes: list[dict[str, Any]]) -> Iterator[Metric]:
        if not remotes:
            return
        lab = ["remote"]
        fams = {
            "lag_bytes": GaugeMetricFamily(P + "remote_lag_bytes", "bytes the remote has not acknowledged", labels=lab),
            "lag_records": GaugeMetricFamily(P + "remote_lag_records", "records the remote has not acknowledged",
                                             labels=lab),
            "lag_seconds": GaugeMetricFamily(P + "remote_lag_seconds", "age of the oldest record the remote lacks",
                                             labels=lab),
            "throughput_bps": GaugeMetricFamily(P + "remote_throughput_bytes_per_second",
                                                "bytes per second acknowledged lately", labels=lab),
        }
        acked = CounterMetricFamily(P + "remote_acked_bytes", "bytes the remote acknowledged", labels=lab)
        connects = CounterMetricFamily(P + "remote_connects", "sessions opened to the remote", labels=lab)
        up = GaugeMetricFamily(P + "remote_link_up", "1 while the link streams or resyncs", labels=lab)
        state = GaugeMetricFamily(P + "remote_link_state", "1 for the link's current state", labels=[*lab, "state"])
        degraded = GaugeMetricFamily(P + "remote_degraded", "1 while a sync remote is bypassed", labels=lab)
        resync = GaugeMetricFamily(P + "remote_resync_active", "1 while a resync runs", labels=lab)
        resync_n = GaugeMetricFamily(P + "remote_resync_regions", "resync progress in regions",
                                     labels=[*lab, "kind"])
        errors = GaugeMetricFamily(P + "remote_recent_errors", "link errors kept in status", labels=lab)
        for r in remotes:
            name = str(r.get("name") or r.get("address"))
            for key, fam in fams.items():
                v = _num(r.get(key))
                if v is not None:
                    fam.add_metric([name], v)
            acked.add_metric([name], float(r.get("bytes_acked") or 0))
            connects.add_metric([name], float(r.get("connects") or 0))
            s = str(r.get("state"))
            up.add_metric([name], 1.0 if s in ("streaming", "resyncing") else 0.0)
            for known in sorted(set(LINK_STATES) | {s}):
                state.add_metric([name, known], 1.0 if known == s else 0.0)
            degraded.add_metric([name], 1.0 if r.get("degraded") else 0.0)
            rs = r.get("resync") or {}
            resync.add_metric([name], 1.0 if rs.get("active") else 0.0)
            for k, v in rs.items():
                n = _num(v)
                if n is not None and k != "active":
                    resync_n.add_metric([name, k], n)
            errors.add_metric([name], float(len(r.get("recent_errors") or [])))
        yield from fams.values()
        yield from (acked, connects, up, state, degraded, resync, resync_n, errors)

    def _sources(self, sources: list[dict[str, Any]]) -> Iterator[Metric]:
        if not sources:
            return
        lab = ["source"]
        applied = GaugeMetricFamily(P + "source_applied_seq", "newest record applied to the target", labels=lab)
        records = CounterMetricFamily(P + "source_applied_records", "records applied", labels=lab)
        nbytes = CounterMetricFamily(P + "source_applied_bytes", "bytes applied", labels=lab)
        conn = GaugeMetricFamily(P + "source_connected", "1 while the source is connected", labels=lab)
        consistent = GaugeMetricFamily(P + "source_consistent",
                                       "0 during a resync or while records a power cut may have torn are "
                                       "applied again (the copy is inconsistent)",
                                       labels=lab)
        age = GaugeMetricFamily(P + "source_applied_record_age_seconds",
                                "host time of the newest applied record, as an age", labels=lab)
        tput = GaugeMetricFamily(P + "source_throughput_bytes_per_second", "bytes per second applied", labels=lab)
        resync = GaugeMetricFamily(P + "source_resync_percent", "resync progress", labels=lab)
        hist = {key: GaugeMetricFamily(P + name, doc, labels=lab) for key, name, doc in (
            ("history_covers_s", "history_covers_seconds", "how far back the point-in-time history reaches"),
            ("history_age_cap_s", "history_age_seconds", "the history age asked for (--history-age)"),
            ("history_size_bytes", "history_size_bytes", "bytes the history holds"),
            ("history_cap_bytes", "history_size_cap_bytes", "the history size cap (--history-size)"),
            ("history_newest_point_age_s", "history_newest_point_age_seconds",
             "age of the newest restore point (the recovery point objective now)"))}
        for s in sources:
            sid = str(s.get("source_id"))
            applied.add_metric([sid], float(s.get("applied_seq") or 0))
            records.add_metric([sid], float(s.get("records_applied") or 0))
            nbytes.add_metric([sid], float(s.get("bytes_applied") or 0))
            conn.add_metric([sid], 1.0 if s.get("state") in ("connected", "resyncing") else 0.0)
            consistent.add_metric([sid], 1.0 if s.get("consistent", True) else 0.0)
            for fam, key in ((age, "applied_record_age_s"), (tput, "throughput_bps"), (resync, "resync_percent")):
                v = _num(s.get(key))
                if v is not None:
                    fam.add_metric([sid], v)
            for key, fam in hist.items():
                v = _num(s.get(key))
                if v is not None:
                    fam.add_metric([sid], v)
        yield from (applied, records, nbytes, conn, consistent, age, tput, resync, *hist.values())
        yield from self._forwards([s for s in sources if isinstance(s.get("forward"), dict)])

    def _forwards(self, sources: list[dict[str, Any]]) -> Iterator[Metric]:
        """A relay's next hop per forwarded source (cascade, docs/REPLICATION.md)."""
        if not sources:
            return
        lab = ["source"]
        fams = {key: GaugeMetricFamily(P + name, doc, labels=lab) for key, name, doc in (
            ("lag_bytes", "forward_lag_bytes", "bytes the next hop has not confirmed (relay journal + dirty regions)"),
            ("lag_records", "forward_lag_records", "relayed records the next hop has not acknowledged"),
            ("lag_seconds", "forward_lag_seconds", "age of the oldest record the next hop lacks"),
            ("journal_used_bytes", "forward_journal_used_bytes", "bytes the relay journal holds"),
            ("journal_capacity_bytes", "forward_journal_capacity_bytes", "the relay journal's size"),
            ("dirty_regions", "forward_dirty_regions", "regions the next hop gets by a resync"))}
        up = GaugeMetricFamily(P + "forward_link_up", "1 while the link to the next hop streams or resyncs",
                               labels=lab)
        for s in sources:
            sid, f = str(s.get("source_id")), s["forward"]
            for key, fam in fams.items():
                v = _num(f.get(key))
                if v is not None:
                    fam.add_metric([sid], v)
            up.add_metric([sid], 1.0 if f.get("state") in ("streaming", "resyncing") else 0.0)
        yield from (*fams.values(), up)

    def _scsi(self, scsi: dict[str, Any]) -> Iterator[Metric]:
        if not scsi:
            return
        cmds = CounterMetricFamily(P + "scsi_commands", "SCSI commands by opcode", labels=["opcode"])
        for op, n in (scsi.get("commands") or {}).items():
            cmds.add_metric([str(op)], float(n))
        errs = CounterMetricFamily(P + "scsi_errors", "SCSI commands that ended in CHECK CONDITION, by sense",
                                   labels=["kind"])
        for kind, n in (scsi.get("errors") or {}).items():
            errs.add_metric([str(kind)], float(n))
        yield cmds
        yield errs
        for key in ("blocks_read", "blocks_written", "flushes"):
            v = _num(scsi.get(key))
            if v is not None:
                yield CounterMetricFamily(P + "scsi_" + key, f"{key.replace('_', ' ')} by the host", value=v)

    def _latency(self, monitor: CommandMonitor) -> Iterator[Metric]:
        h = HistogramMetricFamily(P + "scsi_command_duration_seconds", "time to execute a SCSI command",
                                  labels=["opcode"])
        for op, (counts, total) in sorted(monitor.latency().items()):
            buckets: list[tuple[str, float]] = []
            acc = 0
            for bound, n in zip(LATENCY_BUCKETS_S, counts, strict=False):
                acc += n
                buckets.append((repr(bound), float(acc)))
            acc += counts[-1]
            buckets.append(("+Inf", float(acc)))
            h.add_metric([op], buckets, total)
        yield h


class MetricsServer:
    """`with MetricsServer(("127.0.0.1", 9373), collector) as m: m.port` serves GET /metrics."""

    def __init__(self, listen: tuple[str, int], collector: Collector) -> None:
        self.listen = listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: Any = None
        self._thread: Any = None

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._server, self._thread = start_wsgi_server(self.listen[1], self.listen[0], self.registry)
        log.info("metrics served address=%s:%d path=/metrics", self.listen[0], self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
