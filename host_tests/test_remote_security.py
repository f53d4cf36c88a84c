"""Security of the journey link: TLS 1.3 with mutual certificates from the pairing CA, and a source
may write only its own target. Each refusal is logged and leaves every target untouched."""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import pytest

from firmware.pairing import TlsFiles, client_context, pair, peer_identity
from host_tests.linkkit import wait_until
from host_tests.test_replicator_e2e import BS, Rig, rig, tls_dir

__all__ = ["rig", "tls_dir"]  # fixtures shared with the end-to-end tests


def _write_some(rig: Rig) -> None:
    for i in range(5):
        rig.unit.write(i * 8, bytes([i + 1]) * (8 * BS))


def _untouched(path: Path) -> bool:
    return not path.exists() or not any(path.read_bytes())


def test_pairing_writes_ca_and_unit_certificates(tmp_path: Path) -> None:
    files = pair(tmp_path, "r9", ["a", "b"])
    names = sorted(p.name for p in files)
    assert names == sorted(["ca.crt", "ca.key", "remote-r9.crt", "remote-r9.key", "source-a.crt", "source-a.key",
                            "source-b.crt", "source-b.key"])
    assert (tmp_path / "source-a.key").stat().st_mode & 0o077 == 0
    # adding a source later reuses the CA
    ca_before = (tmp_path / "ca.crt").read_bytes()
    assert [p.name for p in pair(tmp_path, "r9", ["c"])] == ["source-c.crt", "source-c.key"]
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    ctx = client_context(TlsFiles.for_source(tmp_path, "a"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.verify_mode == ssl.CERT_REQUIRED


def test_peer_without_certificate_is_refused(rig: Rig, tls_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="firmware.remote_unit")
    remote = rig.start_remote()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(tls_dir / "ca.crt"))
    ctx.check_hostname = False
    # TLS 1.3: the server checks the (missing) client certificate after the client's Finished
    with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=None) as s, \
            pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s.sendall(b"UJ")
        if not s.recv(100):
            raise ConnectionResetError("closed")
    def logged() -> bool:
        msgs = [r.getMessage() for r in caplog.records if r.name == "firmware.remote_unit"]
        return any("refused" in m and "TLS handshake failed" in m for m in msgs)

    wait_until(lambda: remote.refused >= 1 and logged(), what="refusal counted and logged")
    assert remote.targets["src-a"].connections == 0


def test_tls12_is_refused(rig: Rig, tls_dir: Path) -> None:
    remote = rig.start_remote()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(str(tls_dir / "ca.crt"))
    ctx.load_cert_chain(str(tls_dir / "source-src-a.crt"), str(tls_dir / "source-src-a.key"))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname=None)
    wait_until(lambda: remote.refused >= 1, what="refusal counted")


def test_certificate_from_another_ca_is_refused(rig: Rig, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    other = tmp_path / "other-ca"
    pair(other, "r1", ["src-a"])  # same names, different CA
    remote = rig.start_remote()
    rep = rig.start_rep(tls=TlsFiles.for_source(other, "src-a"))
    _write_some(rig)
    wait_until(lambda: remote.refused >= 1 and rep.links[0].last_error != "", what="refusal")
    assert rep.links[0].state.name != "STREAMING"
    assert remote.targets["src-a"].records_applied == 0 and _untouched(rig.target)
    assert any("refused" in r.getMessage() for r in caplog.records if r.name == "firmware.remote_unit")


def test_source_a_asking_for_source_b_target_is_refused(rig: Rig, tls_dir: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    target_b = rig.tmp / "target-b.img"
    remote = rig.start_remote(targets={"src-a": str(rig.target), "src-b": str(target_b)})
    # a unit holding src-a's certificate claims to be src-b
    rep = rig.start_rep(source_id="src-b", tls=TlsFiles.for_source(tls_dir, "src-a"))
    _write_some(rig)
    wait_until(lambda: rep.links[0].state.name == "REFUSED", what="refusal")
    assert "PERMISSION_DENIED" in rep.links[0].last_error
    assert _untouched(target_b) and _untouched(rig.target)
    assert remote.targets["src-b"].records_applied == 0
    msgs = [r.getMessage() for r in caplog.records if r.name == "firmware.remote_unit"]
    assert any("PERMISSION_DENIED" in m and "src-b" in m for m in msgs)


def test_unknown_source_is_refused(rig: Rig, tls_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    remote = rig.start_remote(targets={"src-a": str(rig.target)})
    rep = rig.start_rep(source_id="src-b")  # a genuine src-b certificate, but no target for it here
    _write_some(rig)
    wait_until(lambda: rep.links[0].state.name == "REFUSED", what="refusal")
    assert "UNKNOWN_SOURCE" in rep.links[0].last_error
    assert remote.refused >= 1 and _untouched(rig.target)
    assert any("UNKNOWN_SOURCE" in r.getMessage() for r in caplog.records if r.name == "firmware.remote_unit")


def test_source_refuses_a_peer_that_is_not_a_remote(rig: Rig, tls_dir: Path) -> None:
    """A listener presenting a *source* certificate (same CA) is not a remote unit."""
    from firmware.pairing import server_context

    ctx = server_context(TlsFiles.for_source(tls_dir, "src-b"))
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    seen: list[object] = []

    def serve() -> None:
        ls.settimeout(10)
        try:
            c, _ = ls.accept()
            with ctx.wrap_socket(c, server_side=True) as s:
                seen.append(peer_identity(s))
                s.recv(10)
        except OSError:
            pass

    import threading

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    rep = rig.start_rep(port=port)
    wait_until(lambda: "expected remote" in rep.links[0].last_error, what="source to refuse the impostor")
    th.join(timeout=10)
    ls.close()
    assert seen == [("source", "src-a")]
