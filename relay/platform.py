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
  protected DACL that grants this user alone).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

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
    inherited, and a link planted there is not followed). On Windows the file gets a
    protected DACL granting this user alone; when that cannot be set the file is
    removed and :class:`PrivateFileError` raised.
    """
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except PermissionError:
        if not WINDOWS:
            raise
        os.chmod(path, stat.S_IWRITE)  # Windows: a read-only file cannot be removed
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
    """Replace the file's DACL by one that grants this process's user full access and
    inherits nothing: other users, even in the same groups, cannot open it."""
    import ctypes
    from ctypes import wintypes

    windll = getattr(ctypes, "WinDLL")  # noqa: B009 - absent from ctypes' POSIX stubs
    advapi32 = windll("advapi32", use_last_error=True)
    kernel32 = windll("kernel32", use_last_error=True)
    sid = _user_sid(advapi32, kernel32)
    descriptor = ctypes.c_void_p()
    convert = advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW
    convert.argtypes = [
        wintypes.LPCWSTR,
        wintypes.DWORD,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p,
    ]
    convert.restype = wintypes.BOOL
    # D:P = a protected DACL (nothing inherited); one entry: this user, all access.
    if not convert(f"D:P(A;;FA;;;{sid})", 1, ctypes.byref(descriptor), None):
        raise PrivateFileError(f"cannot build a private ACL for {path}")
    try:
        set_security = advapi32.SetFileSecurityW
        set_security.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, ctypes.c_void_p]
        set_security.restype = wintypes.BOOL
        dacl_security_information = 0x4
        if not set_security(str(path), dacl_security_information, descriptor):
            raise PrivateFileError(f"cannot make {path} readable by this user alone")
    finally:
        kernel32.LocalFree(descriptor)


def _user_sid(advapi32: Any, kernel32: Any) -> str:  # pragma: no cover - Windows only
    """This process's user as an SDDL SID string (``S-1-5-21-...``)."""
    import ctypes
    from ctypes import wintypes

    token = wintypes.HANDLE()
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    open_token = advapi32.OpenProcessToken
    open_token.argtypes = [wintypes.HANDLE, wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE)]
    token_query, token_user = 0x8, 1
    if not open_token(kernel32.GetCurrentProcess(), token_query, ctypes.byref(token)):
        raise PrivateFileError("cannot read this process's user")
    try:
        size = wintypes.DWORD()
        info = advapi32.GetTokenInformation
        info.argtypes = [
            wintypes.HANDLE,
            ctypes.c_int,
            ctypes.c_void_p,
            wintypes.DWORD,
            ctypes.POINTER(wintypes.DWORD),
        ]
        info(token, token_user, None, 0, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        if not size.value or not info(token, token_user, buffer, size, ctypes.byref(size)):
            raise PrivateFileError("cannot read this process's user")
        sid = ctypes.c_void_p.from_buffer(buffer).value  # TOKEN_USER.User.Sid
        text = wintypes.LPWSTR()
        to_string = advapi32.ConvertSidToStringSidW
        to_string.argtypes = [ctypes.c_void_p, ctypes.POINTER(wintypes.LPWSTR)]
        if not to_string(sid, ctypes.byref(text)):
            raise PrivateFileError("cannot read this process's user")
        try:
            return str(text.value)
        finally:
            kernel32.LocalFree(text)
    finally:
        kernel32.CloseHandle(token)
