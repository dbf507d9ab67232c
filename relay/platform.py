"""What differs between Windows and POSIX for ``gw`` and the agent, decided at run time.

Nothing POSIX-only (``pwd``, ``grp``, ``fcntl``, ``termios``, ``AF_UNIX``,
``SO_PEERCRED``) is imported or looked up at module level anywhere in the client's
and the agent's modules; what needs one of them asks here, when it runs:

- :func:`config_home`: ``%APPDATA%\\gw`` on Windows, ``$XDG_CONFIG_HOME/gw`` (or
  ``~/.config/gw``) elsewhere: the known-agents file and the client's identity key;
- :func:`user_name`: the login name of the user running this process;
- :func:`unix_peer_credentials`: whether the local approvals endpoint can be a Unix
  socket whose kernel names each peer (Linux: ``SO_PEERCRED``); where it cannot
  (Windows, and macOS for now) the agent listens on loopback TCP and a token file
  only the user can read guards it (:mod:`relay.approval`);
- :func:`write_private`: a file only this user can read (mode 0600; on Windows a
  protected DACL that grants the file's owner alone).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import sys
from pathlib import Path

WINDOWS = sys.platform == "win32"


def config_home() -> Path:
    """Where ``gw`` keeps the user's files."""
    if WINDOWS:
        appdata = os.environ.get("APPDATA")
        base = Path(appdata) if appdata else Path.home() / "AppData" / "Roaming"
        return base / "gw"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "gw"


def user_name() -> str:
    """The login name of the user running this process (the uid when it has none)."""
    if not WINDOWS:
        import pwd

        try:
            return pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            return str(os.getuid())
    try:
        return getpass.getuser()
    except OSError:
        return "unknown"


def unix_peer_credentials() -> bool:
    """True where a Unix socket's peer is named by the kernel (SO_PEERCRED)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")


def peer_user(sock: socket.socket) -> tuple[int, str]:
    """The uid and user name of the process at the other end of a Unix socket (kernel's word)."""
    import pwd
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, str(uid)


class PrivateFileError(OSError):
    """A file could not be made readable by its owner alone."""


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` that only this user can read.

    An existing file is replaced (removed first, so its permissions are not
    inherited). On Windows the file gets a protected DACL granting its owner alone;
    when that cannot be set the file is removed and :class:`PrivateFileError` raised.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if WINDOWS:
        try:
            _owner_only_dacl(path)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            raise


def _owner_only_dacl(path: Path) -> None:  # pragma: no cover - Windows only
    """Replace the file's DACL by one that grants its owner (OWNER RIGHTS) full access
    and inherits nothing: other users, even in the same groups, cannot open it."""
    import ctypes
    from ctypes import wintypes

    windll = getattr(ctypes, "WinDLL")  # noqa: B009 - absent from ctypes' POSIX stubs
    advapi32 = windll("advapi32", use_last_error=True)
    kernel32 = windll("kernel32", use_last_error=True)
    descriptor = ctypes.c_void_p()
    convert = advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW
    convert.argtypes = [
        wintypes.LPCWSTR,
        wintypes.DWORD,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p,
    ]
    convert.restype = wintypes.BOOL
    # D:P = a protected DACL (nothing inherited); OW = the owner's rights; FA = all.
    if not convert("D:P(A;;FA;;;OW)", 1, ctypes.byref(descriptor), None):
        raise PrivateFileError(f"cannot build a private ACL for {path}")
    try:
        set_security = advapi32.SetFileSecurityW
        set_security.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, ctypes.c_void_p]
        set_security.restype = wintypes.BOOL
        dacl_security_information = 0x4
        if not set_security(str(path), dacl_security_information, descriptor):
            raise PrivateFileError(f"cannot make {path} readable by its owner alone")
    finally:
        kernel32.LocalFree(descriptor)
