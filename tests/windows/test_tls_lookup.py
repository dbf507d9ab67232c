"""The TLS exporter finds the OpenSSL that ``_ssl`` links to on every platform, and
fails closed with one clear line when it cannot (the login then fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import tls
from relay.errors import TLSBindingError


def test_windows_looks_next_to_ssl_pyd_by_name() -> None:
    found = tls._libssl_candidates("C:/Python313/DLLs/_ssl.pyd", "C:/Python313", "win32")
    assert found[:2] == [
        Path("C:/Python313/DLLs/libssl-3-x64.dll"),
        Path("C:/Python313/DLLs/libssl-3.dll"),
    ]
    assert Path("C:/Python313/DLLs/_ssl.pyd") not in found  # its handle resolves nothing


def test_linux_uses_the_ssl_module_itself_and_macos_the_framework_library() -> None:
    linux = tls._libssl_candidates("/usr/lib/python3.11/_ssl.so", "/usr", "linux")
    assert linux == [Path("/usr/lib/python3.11/_ssl.so")]
    mac = tls._libssl_candidates(
        "/F/Python.framework/Versions/3.13/lib/python3.13/lib-dynload/_ssl.so",
        "/F/Python.framework/Versions/3.13",
        "darwin",
    )
    assert Path("/F/Python.framework/Versions/3.13/lib/libssl.3.dylib") in mac


def test_no_usable_libssl_fails_closed_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "libssl-3.dll"
    fake.write_bytes(b"MZ not a library")
    monkeypatch.setattr(tls, "_libssl_candidates", lambda *a: [fake, tmp_path / "absent.dll"])
    with pytest.raises(TLSBindingError) as raised:
        tls._load_libssl()
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith("TLS exporter unavailable: this Python's OpenSSL exports no")
    assert "tried libssl-3.dll;" in text or "tried libssl-3.dll)" in text


def test_the_real_lookup_here_finds_the_exporter() -> None:
    assert tls._load_libssl().SSL_export_keying_material is not None
