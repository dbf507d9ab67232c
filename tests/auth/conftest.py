"""Fixtures for tests/auth: the smartcard test PKI and pcscd with the vpcd readers.

tests/ has no ``__init__.py`` files; helpers live in tests/support, which
tests/conftest.py puts on ``sys.path`` (repeated here so these tests do not depend on
it), and test modules import them by bare name: ``pki``, ``pcsc``, ``virtual_piv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent.parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

import pki  # noqa: E402
from pcsc import pcscd_vpcd  # noqa: E402, F401 - session fixture: pcscd with the vpcd readers


@pytest.fixture(scope="session")
def card_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.CardPKI:
    """The national-profile test PKI (keys generated once per session)."""
    return pki.CardPKI(tmp_path_factory.mktemp("card-pki"))
