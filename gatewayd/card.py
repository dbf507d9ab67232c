"""Employees' PKI smartcards in the directory: ``gw admin user add --cert-...``, ``user set-cert``.

An employee's ``smartcard`` credential names the person the card's certificate must
name (see :mod:`auth.smartcard`): ``{"cert_serial": VALUE}``, and, when it was taken
from the certificate itself, ``"issuer"`` too, which pins the issuing CA.

The admin request carries one of

- ``cert_serial``: the value of the certificate subject's ``[auth.smartcard]
  subject_field`` (``serialNumber`` by default), as the card order says it;
- ``certificate``: the person's certificate in PEM; the gateway takes the value of the
  subject field its running config names, and the issuer.

``user.add`` stores it with the new user; ``user.set_cert`` replaces it when a card is
renewed. Both are audited as ``admin.change`` with ``cert_serial`` and ``issuer``.
"""

from __future__ import annotations

from typing import Any, Final

from auth import smartcard
from relay.errors import ConfigError

from .operation import Admin, AdminError, arg_id

METHOD: Final = "smartcard"

#: Longest subject value accepted. Person numbers are ~30 characters; a DN attribute
#: is at most 64 in X.520's upper bounds, e-mail addresses up to 255.
MAX_VALUE: Final = 256
#: Largest PEM accepted: one person certificate is 2-3 KiB.
MAX_PEM: Final = 32 * 1024


def credential_from_args(s: Admin, args: dict[str, Any]) -> dict[str, str] | None:
    """The ``smartcard`` credential an admin request asks for, or None if it names none."""
    serial = args.get("cert_serial")
    pem = args.get("certificate")
    if serial is not None and pem is not None:
        raise AdminError("give either --cert-serial or --cert-file, not both")
    if serial is not None:
        if (
            not isinstance(serial, str)
            or not 0 < len(serial) <= MAX_VALUE
            or not serial.isprintable()
            or serial != serial.strip()
        ):
            raise AdminError(f"cert_serial: expected 1 to {MAX_VALUE} printable characters")
        return {"cert_serial": serial}
    if pem is None:
        return None
    if not isinstance(pem, str) or len(pem) > MAX_PEM:
        raise AdminError("certificate: expected one PEM certificate")
    settings = s.broker.config.auth.get(METHOD, {})
    field = settings.get("subject_field", smartcard.DEFAULT_SUBJECT_FIELD)
    try:
        return smartcard.credential_from_certificate(pem.encode(), field)
    except ConfigError as exc:
        raise AdminError(f"the gateway's config: {exc}") from exc
    except ValueError as exc:
        raise AdminError(f"certificate: {exc}") from exc


def audit_fields(credential: dict[str, str] | None) -> dict[str, Any]:
    """What ``admin.change`` records of a smartcard credential."""
    if credential is None:
        return {}
    return {"cert_serial": credential["cert_serial"], "issuer": credential.get("issuer")}


async def user_set_cert(s: Admin, args: dict[str, Any], by: str) -> Any:
    user = arg_id(args, "user")
    credential = credential_from_args(s, args)
    if credential is None:
        raise AdminError("give --cert-serial VALUE or --cert-file PEM")
    if await s.store.get_user(user) is None:
        raise AdminError(f"no user {user!r}")
    replaced = await s.store.get_credential(user, METHOD) is not None
    await s.store.set_credential(user, METHOD, credential, s.now())
    await s.changed(by, "user.set_cert", user=user, replaced=replaced, **audit_fields(credential))
    return {"user": user, **credential}
