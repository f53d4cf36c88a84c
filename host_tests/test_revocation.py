"""Revocation and renewal of unit certificates: `usbmirror pair DIR --revoke NAME` writes a CRL that a
running remote and a running source pick up at their next handshake; `--renew NAME` issues a fresh
certificate that works end to end; status warns 30 days before a certificate runs out."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from firmware import cli, pairing
from firmware.pairing import TlsFiles, expiry_report, pair
from host_tests.linkkit import wait_until
from host_tests.test_replicator_e2e import BS, Rig


@pytest.fixture
def own_pairing(tmp_path: Path) -> Path:
    d = tmp_path / "pair"
    pair(d, "r1", ["src-a", "src-b"])
    return d


@pytest.fixture
def rig(tmp_path: Path, own_pairing: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, own_pairing)
    yield r
    r.close()


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _write(rig: Rig, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        rig.unit.write(i * 8, bytes([i % 250 + 1]) * (8 * BS))


def test_revoke_writes_a_crl_signed_by_the_ca_and_keeps_earlier_entries(own_pairing: Path) -> None:
    assert cli.main(["pair", str(own_pairing), "--revoke", "src-a"]) == 0
    ca = x509.load_pem_x509_certificate((own_pairing / "ca.crt").read_bytes())
    crl = x509.load_pem_x509_crl((own_pairing / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(_serial(own_pairing / "source-src-a.crt")) is not None
    assert cli.main(["pair", str(own_pairing), "--revoke", "remote:r1"]) == 0
    assert cli.main(["pair", str(own_pairing), "--revoke", "src-a"]) == 0  # again: no duplicate entry
    crl = x509.load_pem_x509_crl((own_pairing / "crl.pem").read_bytes())
    serials = sorted(e.serial_number for e in crl)
    assert serials == sorted([_serial(own_pairing / "source-src-a.crt"), _serial(own_pairing / "remote-r1.crt")])
    assert crl.next_update_utc is not None and crl.next_update_utc >= ca.not_valid_after_utc


def test_revoke_and_renew_refuse_unknown_or_ambiguous_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    d = tmp_path / "p"
    pair(d, "x", ["x"])  # a remote and a source with the same name
    assert cli.main(["pair", str(d), "--revoke", "nobody"]) == 2
    assert "no certificate for unit 'nobody'" in capsys.readouterr().err
    assert cli.main(["pair", str(d), "--revoke", "x"]) == 2
    assert "say remote:x or source:x" in capsys.readouterr().err
    assert cli.main(["pair", str(d), "--renew", "x", "--source", "y"]) == 2
    assert cli.main(["pair", str(tmp_path / "empty"), "--renew", "x"]) == 2
    assert "holds no pairing CA" in capsys.readouterr().err
    assert cli.main(["pair", str(d)]) == 2
    assert "--remote and at least one --source" in capsys.readouterr().err
    assert not (d / "crl.pem").exists()


def test_running_remote_refuses_a_revoked_source_and_logs_it(rig: Rig, own_pairing: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    remote = rig.start_remote()
    rig.start_rep()
    rig.wait_streaming()
    _write(rig, 5)
    rig.drain()
    rig.stop_rep()
    applied = remote.targets["src-a"].records_applied
    refused_before = remote.refused
    pairing.revoke(own_pairing, "src-a")  # the remote keeps running: no restart
    rep = rig.start_rep()
    _write(rig, 5, start=5)
    wait_until(lambda: remote.refused > refused_before, what="the remote to refuse the revoked source")

    def logged() -> bool:
        return any("refused" in r.getMessage() and "certificate revoked" in r.getMessage()
                   for r in caplog.records if r.name == "firmware.remote_unit")

    wait_until(logged, what="the refusal logged with its reason")
    assert rep.links[0].state.name != "STREAMING"
    assert remote.targets["src-a"].records_applied == applied
    assert any("TLS files reloaded" in r.getMessage() for r in caplog.records)


def test_running_source_refuses_a_revoked_remote(rig: Rig, own_pairing: Path) -> None:
    rig.start_remote()
    rep = rig.start_rep()
    rig.wait_streaming()
    port = rig.port
    pairing.revoke(own_pairing, "r1")
    rig.stop_remote()  # the link drops; the source reconnects with the CRL it finds on disk now
    rig.port = port
    rig.start_remote()
    wait_until(lambda: "certificate revoked" in rep.links[0].last_error, what="the source to refuse the remote")
    assert rep.links[0].state.name != "STREAMING"


def test_renewed_certificate_works_end_to_end(rig: Rig, own_pairing: Path) -> None:
    remote = rig.start_remote()
    rig.start_rep()
    rig.wait_streaming()
    _write(rig, 5)
    rig.drain()
    rig.stop_rep()
    old = _serial(own_pairing / "source-src-a.crt")
    pairing.revoke(own_pairing, "src-a")  # the old certificate is no longer accepted ...
    assert cli.main(["pair", str(own_pairing), "--renew", "src-a"]) == 0  # ... the fresh one is
    assert _serial(own_pairing / "source-src-a.crt") != old
    assert (own_pairing / "source-src-a.key").stat().st_mode & 0o077 == 0
    rig.start_rep()
    _write(rig, 5, start=5)
    rig.drain()
    assert rig.same()
    assert remote.targets["src-a"].records_applied >= 10


def test_a_damaged_crl_keeps_the_previous_context_and_says_why(own_pairing: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="firmware.pairing")
    ctx = pairing.server_context(TlsFiles.for_remote(own_pairing, "r1"))
    assert isinstance(ctx, pairing.PairingContext)
    before = ctx.current()
    (own_pairing / "crl.pem").write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    assert ctx.current() is before
    assert any("do not load" in r.getMessage() and "not a readable CRL" in r.getMessage() for r in caplog.records)
    with pytest.raises(pairing.PairingError, match="not a readable CRL"):
        pairing.client_context(TlsFiles.for_source(own_pairing, "src-a"))


def test_expiry_report_warns_thirty_days_ahead(own_pairing: Path) -> None:
    files = TlsFiles.for_source(own_pairing, "src-a")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    end = cert.not_valid_after_utc
    far = expiry_report(files, end - datetime.timedelta(days=31))
    assert far["cert_expires"] == end.isoformat()
    assert not [w for w in far["warnings"] if w.startswith("certificate")]
    near = expiry_report(files, end - datetime.timedelta(days=29, hours=1))
    assert any(w.startswith("certificate expires in 29 days") and "--renew" in w for w in near["warnings"])
    gone = expiry_report(files, end + datetime.timedelta(days=1))
    assert any(w.startswith("certificate expired") for w in gone["warnings"])
    assert expiry_report(files, datetime.datetime.now(datetime.UTC))["warnings"] == []


def test_local_unit_without_remotes_runs_without_cryptography(tmp_path):
    """A board's first boot (no remotes, no TLS files) must not need the `cryptography` package: the
    guest image of the real-kernel gadget test has none, and `usbmirror local` must still serve and
    answer `status`."""
    import signal
    import subprocess
    import sys
    import time
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "from firmware import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    state = tmp_path / "state"
    p = subprocess.Popen([sys.executable, "-c", code, "local", "--volume", str(tmp_path / "vol.img"),
                          "--size", "1M", "--state-dir", str(state), "--usbip", "127.0.0.1:0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        st = None
        while time.monotonic() < deadline and p.poll() is None:
            r = subprocess.run([sys.executable, "-c", code, "status", "--state-dir", str(state), "--json"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                st = r.stdout
                break
            time.sleep(0.2)
        assert st is not None, p.stderr.read() if p.poll() is not None else "no status within 30 s"
    finally:
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "ModuleNotFoundError" not in err
