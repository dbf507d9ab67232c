"""Signed checkpoints of the audit trail: every kind of tampering is found, even a whole
trail rewritten with a consistent chain and head by someone without the key."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatewayd.audit import (
    CHECKPOINT,
    GENESIS,
    HEAD_SIZE,
    AuditLog,
    checkpoint_message,
    head_path,
    key_id,
    line_hash,
    load_or_create_key,
    load_public_key,
    public_key_text,
    read_lines,
    verify,
)

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


async def signed_log(path: Path, n: int, *, every: int = 5, first: int = 0, **kw: Any) -> None:
    log = AuditLog(path, node="gw1", fsync=False, signer=KEY, checkpoint_every=every, **kw)
    log.write_startup_records()
    try:
        for i in range(first, first + n):
            await log.record("test.event", i=i, user=f"user{i % 3}")
    finally:
        await log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def rewrite(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new))


def write_head(path: Path, seq: int, hash_: str) -> None:
    record = json.dumps({"seq": seq, "hash": hash_}).encode().ljust(HEAD_SIZE - 1)
    head_path(path).write_bytes(record + b"\n")


def rechain(recs: list[dict[str, Any]]) -> list[bytes]:
    """What an intruder without the key can do: a consistent chain over any records."""
    out: list[bytes] = []
    prev = GENESIS
    for seq, rec in enumerate(recs, 1):
        rec = {**rec, "seq": seq, "prev": prev}
        line = json.dumps(rec, separators=(",", ":")).encode()
        out.append(line)
        prev = line_hash(line)
    return out


def rewrite_whole(path: Path, recs: list[dict[str, Any]]) -> None:
    new = rechain(recs)
    rewrite(path, new)
    write_head(path, len(new), line_hash(new[-1]))


def events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in read_lines(path)]


@pytest.mark.asyncio
async def test_checkpoints_are_written_and_verify(log_path: Path) -> None:
    await signed_log(log_path, 12, every=5)
    evs = events(log_path)
    # At start, after every 5 records, and at close.
    assert evs[0] == CHECKPOINT
    assert evs.count(CHECKPOINT) == 1 + 2 + 1
    assert evs[-1] == CHECKPOINT
    result = verify(log_path, PUB)
    assert result.ok, result.problems
    assert result.checkpoints == 4
    assert result.last_checkpoint is not None
    assert result.last_checkpoint.seq == len(evs) - 1
    assert result.unsigned == 0
    cp = json.loads(lines(log_path)[-1])
    assert cp["key_id"] == key_id(PUB)
    assert cp["signed_seq"] == cp["seq"] - 1
    assert cp["signed_hash"] == cp["prev"]


@pytest.mark.asyncio
async def test_a_checkpoint_after_a_quiet_interval(log_path: Path) -> None:
    log = AuditLog(
        log_path,
        node="gw1",
        fsync=False,
        signer=KEY,
        checkpoint_every=1000,
        checkpoint_seconds=0.05,
    )
    log.start()
    try:
        log.write_startup_records()
        await log.record("test.event", i=1)
        async with asyncio.timeout(10):
            while events(log_path)[-1] != CHECKPOINT:
                await asyncio.sleep(0.02)
    finally:
        await log.close()
    last = json.loads(lines(log_path)[-1])
    assert (last["reason"], last["signed_seq"]) == ("time", 2)
    assert verify(log_path, PUB).ok


@pytest.mark.asyncio
async def test_a_restart_continues_the_signed_chain(log_path: Path) -> None:
    await signed_log(log_path, 7)
    await signed_log(log_path, 7, first=7)
    result = verify(log_path, PUB)
    assert result.ok, result.problems
    assert [json.loads(x).get("i") for x in read_lines(log_path) if b'"i":' in x] == list(range(14))


def where_of(problem: str) -> tuple[str, int, int | None]:
    file, _, rest = problem.partition(" line ")
    number, _, rest = rest.partition(": ")
    seq = int(rest.split(":")[0].removeprefix("seq ")) if rest.startswith("seq ") else None
    return file, int(number), seq


@pytest.mark.asyncio
async def test_an_edit_is_found_with_file_line_and_seq(log_path: Path) -> None:
    await signed_log(log_path, 12)
    raw = lines(log_path)
    raw[4] = raw[4].replace(b'"user0"', b'"mallory"').replace(b'"user1"', b'"mallory"')
    assert b"mallory" in raw[4]
    rewrite(log_path, raw)
    result = verify(log_path, PUB)
    assert not result.ok
    file, number, seq = where_of(result.problems[0])
    assert (file, number, seq) == ("audit.jsonl", 6, 6)
    assert "changed, removed or moved" in result.problems[0]


@pytest.mark.asyncio
@pytest.mark.parametrize("tamper", ["delete", "insert", "reorder", "truncate"])
async def test_each_kind_of_tampering_is_found(log_path: Path, tamper: str) -> None:
    await signed_log(log_path, 12)
    raw = lines(log_path)
    if tamper == "delete":
        del raw[5]
    elif tamper == "insert":
        raw.insert(5, raw[2])
    elif tamper == "reorder":
        raw[4], raw[5] = raw[5], raw[4]
    else:
        raw = raw[:-3]
    rewrite(log_path, raw)
    result = verify(log_path, PUB)
    assert not result.ok
    assert all(p.startswith("audit.jsonl line ") for p in result.problems), result.problems
    if tamper == "truncate":
        assert "truncated" in result.problems[-1]
    else:
        # The first line that no longer fits: the moved one, else the one after the change.
        assert where_of(result.problems[0])[1] == (5 if tamper == "reorder" else 6)


@pytest.mark.asyncio
async def test_a_whole_rewrite_keeping_the_checkpoints_is_found(log_path: Path) -> None:
    await signed_log(log_path, 12)
    recs = [json.loads(x) for x in lines(log_path)]
    for rec in recs:
        if rec.get("user") == "user1":
            rec["user"] = "someone-else"
    rewrite_whole(log_path, recs)
    assert verify(log_path).ok  # the chain and head alone are consistent: no key, no proof
    result = verify(log_path, PUB)
    assert not result.ok
    assert any("checkpoint signs seq" in p for p in result.problems), result.problems


@pytest.mark.asyncio
async def test_a_whole_rewrite_without_checkpoints_is_found(log_path: Path) -> None:
    await signed_log(log_path, 12)
    recs = [json.loads(x) for x in lines(log_path) if b'"audit.checkpoint"' not in x]
    rewrite_whole(log_path, recs)
    assert verify(log_path).ok
    result = verify(log_path, PUB)
    assert not result.ok
    assert any("no checkpoint signed by this key" in p for p in result.problems)


@pytest.mark.asyncio
async def test_dropping_later_checkpoints_is_found(log_path: Path) -> None:
    await signed_log(log_path, 60, every=5)
    raw = lines(log_path)
    recs = [json.loads(x) for x in raw]
    # Keep the first checkpoint (its chain is unchanged), drop all later ones.
    first_cp = next(i for i, r in enumerate(recs) if r["event"] == CHECKPOINT)
    kept = recs[: first_cp + 1] + [r for r in recs[first_cp + 1 :] if r["event"] != CHECKPOINT]
    new = rechain(kept)
    assert new[: first_cp + 1] == raw[: first_cp + 1]
    rewrite(log_path, new)
    write_head(log_path, len(new), line_hash(new[-1]))
    result = verify(log_path, PUB)
    assert not result.ok
    assert any("without another: checkpoints removed" in p for p in result.problems)


@pytest.mark.asyncio
@pytest.mark.parametrize("forge_key_id", [False, True])
async def test_checkpoints_signed_with_another_key_are_found(
    log_path: Path, forge_key_id: bool
) -> None:
    await signed_log(log_path, 12)
    other = Ed25519PrivateKey.generate()
    recs = [json.loads(x) for x in lines(log_path)]
    recs = [r for r in recs if r["event"] != CHECKPOINT]
    recs[3]["user"] = "someone-else"
    # Re-sign the rewritten chain at the same places, with a key of the intruder's own.
    out: list[dict[str, Any]] = []
    prev, seq = GENESIS, 0
    for rec in [*recs, None]:
        if rec is None or (seq and seq % 5 == 0):
            ts = "2026-12-01T00:00:00.000000Z"
            sig = other.sign(checkpoint_message("gw1", seq, prev, ts, 5))
            kid = key_id(PUB) if forge_key_id else key_id(other.public_key())
            cp = {"ts": ts, "seq": seq + 1, "prev": prev, "node": "gw1", "event": CHECKPOINT}
            cp |= {"signed_seq": seq, "signed_hash": prev, "signed_ts": ts, "every": 5}
            cp |= {"key_id": kid, "reason": "count", "sig": base64.b64encode(sig).decode()}
            out.append(cp)
            prev, seq = line_hash(rechain_one(cp)), seq + 1
        if rec is not None:
            rec = {**rec, "seq": seq + 1, "prev": prev}
            out.append(rec)
            prev, seq = line_hash(rechain_one(rec)), seq + 1
    new = [rechain_one(r) for r in out]
    rewrite(log_path, new)
    write_head(log_path, len(new), line_hash(new[-1]))
    assert verify(log_path).ok
    result = verify(log_path, PUB)
    assert not result.ok
    want = "does not verify (forged)" if forge_key_id else "signed by key"
    assert want in result.problems[0], result.problems
    assert result.last_checkpoint is None


def rechain_one(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode()


def test_the_key_is_made_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.key"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create_key(path)
    assert public_key_text(again.public_key()) == public_key_text(key.public_key())
    pub = tmp_path / "audit.pub"
    pub.write_text(public_key_text(key.public_key()) + "\n")
    assert key_id(load_public_key(pub)) == key_id(key.public_key())
    assert key_id(load_public_key(path)) == key_id(key.public_key())


@pytest.mark.asyncio
async def test_gw_audit_verify_with_the_public_key_only_elsewhere(
    log_path: Path, tmp_path: Path
) -> None:
    """On another host: a copy of the trail and the printed public key, no config, no key."""
    await signed_log(log_path, 12)
    pub = tmp_path / "gateway.pub"
    pub.write_text(public_key_text(PUB) + "\n")
    gw = [sys.executable, "-m", "cli.main", "audit", "verify", "--path", str(log_path)]
    ok = subprocess.run([*gw, "--key", str(pub)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "last verified checkpoint: seq 15" in ok.stdout
    assert "ok: 16 records" in ok.stdout
    recs = [json.loads(x) for x in lines(log_path) if b'"audit.checkpoint"' not in x]
    rewrite_whole(log_path, recs)
    bad = subprocess.run([*gw, "--key", str(pub)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "FAIL: audit.jsonl line 12: no checkpoint signed by this key" in bad.stderr


@pytest.mark.asyncio
async def test_a_new_key_verifies_with_both_keys(log_path: Path) -> None:
    """A lost key replaced: the older part verifies with the older key, given as well."""
    await signed_log(log_path, 7)
    newer = Ed25519PrivateKey.generate()
    log = AuditLog(log_path, node="gw1", fsync=False, signer=newer, checkpoint_every=5)
    log.write_startup_records()
    for i in range(7):
        await log.record("test.event", i=i)
    await log.close()
    assert verify(log_path, [PUB, newer.public_key()]).ok
    only_old = verify(log_path, PUB)
    assert not only_old.ok and "signed by key" in only_old.problems[0]
    assert not verify(log_path, newer.public_key()).ok


@pytest.mark.asyncio
async def test_the_key_is_made_at_the_first_start_if_missing(tmp_path: Path) -> None:
    from gatewayd import config as config_mod
    from gatewayd.audit import audit_key_path, open_audit_log, public_key_file

    path = tmp_path / "gatewayd.toml"
    path.write_text(
        '[gateway]\nlisten = "127.0.0.1:1"\n[tls]\ncert_file = "c"\nkey_file = "k"\n'
        'ca_file = "a"\nca_key_file = "b"\n[store]\npath = "state/d.db"\n'
        'secrets_key_file = "state/s.key"\n[audit]\npath = "log/audit.jsonl"\n'
        'checkpoint_every = 3\n[admin]\nsocket = "s.sock"\n'
    )
    cfg = config_mod.load(path)
    assert audit_key_path(cfg) == tmp_path / "state" / "audit.key"
    assert not audit_key_path(cfg).exists()
    log = open_audit_log(cfg)
    log.write_startup_records()
    for i in range(4):
        await log.record("test.event", i=i)
    await log.close()
    key = load_public_key(public_key_file(audit_key_path(cfg)))
    assert key_id(key) == key_id(load_or_create_key(audit_key_path(cfg)).public_key())
    result = verify(cfg.audit.path, key)
    assert result.ok and result.checkpoints == 3  # start, after 3 records, stop
