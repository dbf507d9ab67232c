"""A throwaway PKI shaped like the national person-certificate profile, for tests.

Layout (all names are fake, all keys are generated per test session)::

    Test Root CA G1                       trust anchor (RSA-2048), CRL in PEM
    └── Test Person High CA G1            intermediate (RSA-2048), CRL in DER
        ├── person auth cert              digitalSignature (+keyEncipherment /
        │                                 keyAgreement), EKU clientAuth,
        │                                 policy 2.16.578.1.26.1.3.1,
        │                                 subject serialNumber UN:NO-9578-4050-<n>
        └── person signing cert           nonRepudiation only (same policy)

    Test Root CA G1 (a *different* key)   a rogue root with the same name, not trusted
    └── Test Person High CA G1            its intermediate, same name as the real one

A person "card" holds one auth certificate (PIV slot 9A) and one signing certificate
(PIV slot 9C), each with its own key, RSA-2048 or ECC P-256.

Times are relative to ``now`` (default: the real clock at construction, rounded to
the second), so the certificates are also valid for code that reads the real clock
(the prover's expiry check).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

POLICY_PERSON_CARD = "2.16.578.1.26.1.3.1"
"""Person certificate, assurance level high, key on a smartcard."""
POLICY_PERSON_HSM = "2.16.578.1.26.1.3.6"
"""Person certificate, assurance level high, key in a central HSM (not a card)."""
POLICY_ENTERPRISE = "2.16.578.1.26.1.3.2"
"""Enterprise certificate (an organisation, not a person)."""
POLICY_ENTERPRISE_HSM = "2.16.578.1.26.1.3.5"
"""Enterprise certificate, key in an HSM."""

PERSON_ID_PREFIX = "UN:NO-9578-4050-"

KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

DAY = dt.timedelta(days=1)


def person_id(n: int) -> str:
    """The subject serialNumber of test person ``n`` (the credential value)."""
    return f"{PERSON_ID_PREFIX}{n:09d}"


def new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_type(self) -> KeyType:
        return "rsa" if isinstance(self.key, rsa.RSAPrivateKey) else "ec"


@dataclass(frozen=True)
class PersonCard:
    """What a person's smartcard holds."""

    person: str
    """The subject serialNumber, e.g. ``UN:NO-9578-4050-000000001``."""
    auth: Issued
    """PIV Authentication (slot 9A, data object 5FC105)."""
    sign: Issued
    """Digital Signature (slot 9C, data object 5FC10A)."""

    @property
    def credential(self) -> dict[str, str]:
        """The employee's stored smartcard credential."""
        return {"cert_serial": self.person}


@dataclass
class CA:
    """One certificate authority: key, certificate and what it has revoked."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    revoked: dict[int, dt.datetime] = field(default_factory=dict)

    @property
    def name(self) -> x509.Name:
        return self.cert.subject

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(
        self, subject: x509.Name, public_key: Any, not_before: dt.datetime, not_after: dt.datetime
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def issue_ca(
        self, common_name: str, not_before: dt.datetime, not_after: dt.datetime, policies: list[str]
    ) -> CA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = _ca_name(common_name)
        cert = (
            self._builder(subject, key.public_key(), not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(_policies(policies), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return CA(key, cert)

    def issue_person(
        self,
        n: int,
        key: PrivateKey,
        *,
        usage: Literal["auth", "sign"],
        policy: str | None,
        not_before: dt.datetime,
        not_after: dt.datetime,
        subject_serial: str | None = None,
        crl_dps: list[str] | None = None,
    ) -> Issued:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "NO"),
                x509.NameAttribute(NameOID.SURNAME, "Nordmann"),
                x509.NameAttribute(NameOID.GIVEN_NAME, f"Kari{n}"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, subject_serial or person_id(n)),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Nordmann Kari{n}"),
            ]
        )
        builder = self._builder(subject, key.public_key(), not_before, not_after)
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if usage == "auth":
            rsa_key = isinstance(key, rsa.RSAPrivateKey)
            builder = builder.add_extension(
                _key_usage(
                    digital_signature=True, key_encipherment=rsa_key, key_agreement=not rsa_key
                ),
                critical=True,
            ).add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION]
                ),
                critical=False,
            )
        else:
            builder = builder.add_extension(_key_usage(content_commitment=True), critical=True)
        if policy is not None:
            builder = builder.add_extension(_policies([policy]), critical=False)
        if crl_dps:
            builder = builder.add_extension(crl_distribution_points(crl_dps), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key)

    def revoke(self, cert: x509.Certificate, when: dt.datetime) -> None:
        assert cert.issuer == self.name
        self.revoked[cert.serial_number] = when

    def crl(
        self,
        last_update: dt.datetime,
        next_update: dt.datetime | None,
        number: int = 1,
        *,
        idp: x509.IssuingDistributionPoint | None = None,
        delta_of: int | None = None,
        listed: bool = True,
    ) -> x509.CertificateRevocationList:
        """A CRL of this CA. ``idp``: a partitioned (or scoped) CRL; ``delta_of``: a delta
        CRL on that base CRL number; ``listed=False``: an empty one, whatever was revoked."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(last_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if next_update is not None:
            builder = builder.next_update(next_update)
        if idp is not None:
            builder = builder.add_extension(idp, critical=True)
        if delta_of is not None:
            builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
        for serial, when in self.revoked.items() if listed else ():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(when)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())


def crl_distribution_points(uris: list[str]) -> x509.CRLDistributionPoints:
    """A certificate's CRLDistributionPoints: one distribution point per URI."""
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint([x509.UniformResourceIdentifier(u)], None, None, None)
            for u in uris
        ]
    )


def partition(
    uri: str | None,
    *,
    only_user: bool = False,
    only_ca: bool = False,
    indirect: bool = False,
    reasons: frozenset[x509.ReasonFlags] | None = None,
) -> x509.IssuingDistributionPoint:
    """An IssuingDistributionPoint: the partition named ``uri`` (None: the scope flags only)."""
    return x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(uri)] if uri else None,
        relative_name=None,
        only_contains_user_certs=only_user,
        only_contains_ca_certs=only_ca,
        only_some_reasons=reasons,
        indirect_crl=indirect,
        only_contains_attribute_certs=False,
    )


def _ca_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "NO"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Trust Services AS-000000001"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def _ca_key_usage() -> x509.KeyUsage:
    return _key_usage(key_cert_sign=True, crl_sign=True)


def _policies(oids: list[str]) -> x509.CertificatePolicies:
    return x509.CertificatePolicies(
        [x509.PolicyInformation(x509.ObjectIdentifier(oid), None) for oid in oids]
    )


def new_root(common_name: str, not_before: dt.datetime, not_after: dt.datetime) -> CA:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = _ca_name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert)


class CardPKI:
    """The test PKI: a trusted root and intermediate, a rogue look-alike pair, persons.

    ``directory`` receives the PEM/DER files that :meth:`settings` names.
    """

    INTERMEDIATE_POLICIES = [
        POLICY_PERSON_CARD,
        POLICY_ENTERPRISE,
        POLICY_ENTERPRISE_HSM,
        POLICY_PERSON_HSM,
    ]

    def __init__(self, directory: Path, now: dt.datetime | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        long_ago, far_ahead = self.now - 365 * DAY, self.now + 3650 * DAY
        self.root = new_root("Test Root CA G1", long_ago, far_ahead)
        self.intermediate = self.root.issue_ca(
            "Test Person High CA G1", long_ago, far_ahead, self.INTERMEDIATE_POLICIES
        )
        # Same names, different keys: a forger's chain that must not be trusted.
        self.rogue_root = new_root("Test Root CA G1", long_ago, far_ahead)
        self.rogue_intermediate = self.rogue_root.issue_ca(
            "Test Person High CA G1", long_ago, far_ahead, self.INTERMEDIATE_POLICIES
        )
        self._keys: dict[tuple[int, str, KeyType], PrivateKey] = {}
        self._tables = 0
        self.files = directory
        """Where :meth:`settings` wrote its last table's files."""

    # -- people -----------------------------------------------------------------------

    def key(self, n: int, slot: str, key_type: KeyType) -> PrivateKey:
        """Person ``n``'s key for ``slot`` ("auth" or "sign"), made once."""
        cached = self._keys.get((n, slot, key_type))
        if cached is None:
            cached = self._keys[(n, slot, key_type)] = new_key(key_type)
        return cached

    def person(
        self,
        n: int,
        key_type: KeyType = "rsa",
        *,
        usage: Literal["auth", "sign"] = "auth",
        policy: str | None = POLICY_PERSON_CARD,
        expired: bool = False,
        not_yet_valid: bool = False,
        issuer: CA | None = None,
        subject_serial: str | None = None,
        crl_dps: list[str] | None = None,
    ) -> Issued:
        """A certificate for person ``n``. Each call issues a new certificate (new serial).

        ``crl_dps``: the URIs of its CRLDistributionPoints (its CRL partition)."""
        if expired:
            not_before, not_after = self.now - 3 * 365 * DAY, self.now - DAY
        elif not_yet_valid:
            not_before, not_after = self.now + DAY, self.now + 3 * 365 * DAY
        else:
            not_before, not_after = self.now - 30 * DAY, self.now + 2 * 365 * DAY
        return (issuer or self.intermediate).issue_person(
            n,
            self.key(n, usage, key_type),
            usage=usage,
            policy=policy,
            not_before=not_before,
            not_after=not_after,
            subject_serial=subject_serial,
            crl_dps=crl_dps,
        )

    def card(self, n: int, key_type: KeyType = "rsa", **kw: Any) -> PersonCard:
        """A smartcard for person ``n``: auth and signing certificates."""
        return PersonCard(
            person_id(n),
            self.person(n, key_type, usage="auth", **kw),
            self.person(n, key_type, usage="sign", **kw),
        )

    def untrusted(self, n: int, key_type: KeyType = "rsa") -> Issued:
        """An auth certificate for person ``n`` from the rogue look-alike chain."""
        return self.person(n, key_type, issuer=self.rogue_intermediate)

    def revoke(self, issued: Issued) -> None:
        """Revoke a person certificate (shows up in the next :meth:`settings`)."""
        self.intermediate.revoke(issued.cert, self.now - DAY)

    # -- files ------------------------------------------------------------------------

    def write_crl(self, name: str, crl: x509.CertificateRevocationList) -> Path:
        """Write one more CRL (DER) next to :meth:`settings`' last files."""
        return self._write(name, crl.public_bytes(serialization.Encoding.DER))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.files / name
        path.write_bytes(data)
        return path

    def write_crls(self, *, stale: bool = False, root_stale: bool = False) -> list[Path]:
        """Write the intermediate's CRL (DER) and the root's CRL (PEM); return their paths.

        ``stale``: the intermediate's CRL is past its nextUpdate; ``root_stale`` likewise
        for the root's CRL.
        """
        hour = dt.timedelta(hours=1)
        fresh = (self.now - hour, self.now + DAY)
        old = (self.now - 8 * DAY, self.now - hour)
        inter = self.intermediate.crl(*(old if stale else fresh))
        root = self.root.crl(*(old if root_stale else fresh))
        return [
            self._write("intermediate.crl", inter.public_bytes(serialization.Encoding.DER)),
            self._write("root.crl.pem", root.public_bytes(serialization.Encoding.PEM)),
        ]

    def settings(
        self,
        *,
        stale: bool = False,
        root_stale: bool = False,
        configured_intermediates: bool = True,
        crls: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """An ``[auth.smartcard]`` table (paths absolute) trusting this PKI's root.

        Each call writes its files to a new subdirectory, so tables never share files.
        """
        self._tables += 1
        self.files = self.directory / f"settings-{self._tables}"
        self.files.mkdir()
        anchors = self._write("root.pem", self.root.pem)
        table: dict[str, Any] = {
            "trust_anchors": [str(anchors)],
            "intermediates": [],
            "crl_files": [],
        }
        if configured_intermediates:
            table["intermediates"] = [str(self._write("intermediate.pem", self.intermediate.pem))]
        if crls:
            table["crl_files"] = [
                str(p) for p in self.write_crls(stale=stale, root_stale=root_stale)
            ]
        table.update(extra)
        return table
