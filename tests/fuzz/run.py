"""Coverage-guided fuzzing with atheris (libFuzzer) over the harnesses in fuzz_targets.py.

    .venv/bin/python tests/fuzz/run.py all --seconds 60     # what `make fuzz` runs
    .venv/bin/python tests/fuzz/run.py wire --seconds 300   # one target for longer
    .venv/bin/python tests/fuzz/run.py wire --replay FILE   # run one input, show the error

Each target runs in its own process for ``--seconds``, starting from (and adding to)
its kept corpus ``tests/fuzz/corpus/<target>/``; afterwards the corpus is minimised
(libFuzzer ``-merge=1``) so that only inputs that add coverage are kept. An input
that makes a harness raise is written to ``tests/fuzz/findings/<target>/`` and the
target counts as failed. The summary gives, per target, the executions run, the
coverage (libFuzzer's ``cov`` and ``ft`` counters) and the corpus size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FINDINGS = HERE / "findings"
#: Packages whose Python code is instrumented for coverage feedback.
INSTRUMENT = ["relay", "auth", "gatewayd", "fido2", "tomllib", "fuzz_targets"]
#: Imported inside the instrumentation, so that the harnesses' lazy imports find them ready.
_FIDO2 = ["auth.fido2", "fido2.cbor", "fido2.webauthn", "fido2.attestation"]
MODULES = {
    "wire": ["relay.protocol"],
    "message": ["relay.message"],
    "noise_handshake": ["relay.noise"],
    "noise_frames": ["relay.noise"],
    "tunnel_records": ["relay.tunnel"],
    "fido2_login": _FIDO2,
    "fido2_client_data": _FIDO2,
    "fido2_registration": _FIDO2,
    "piv_card": ["auth.smartcard"],
    "piv_tlv": ["auth.smartcard"],
    "smartcard_response": ["auth.smartcard"],
    "smartcard_crl": ["auth.smartcard"],
    "enroll_csr": ["gatewayd.ca"],
    "config": ["gatewayd.config", "auth.registry", "auth.fido2"],
    "admin": ["gatewayd.admin", "gatewayd.init"],
}


#: Targets whose input is text: libFuzzer gets a dictionary of their words (-dict).
TEXT_TARGETS = {"wire", "message", "config", "admin", "fido2_client_data"}


def _dictionary(name: str, path: Path) -> list[str]:
    """libFuzzer -dict arguments: the words of the target's seeds and message vocabulary."""
    if name not in TEXT_TARGETS:
        return []
    words: set[str] = set()
    for seed in (HERE / "corpus" / name).glob("seed-*"):
        words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_.]{2,40}", seed.read_text(errors="ignore")))
    if name in ("wire", "message"):
        import dataclasses

        from relay import message

        for cls in message.MESSAGE_TYPES.values():
            words.add(cls.TYPE)
            words.update(f.name for f in dataclasses.fields(cls))
    entries = sorted(words)[:400]
    path.write_text("".join(f'"{w}"\n' for w in entries))
    return [f"-dict={path}"]


def _child(name: str, libfuzzer_args: list[str]) -> None:
    """In the fuzzing process: instrument, then hand over to libFuzzer."""
    import importlib

    import atheris

    sys.path[:0] = [str(HERE), str(HERE.parent / "support"), str(ROOT)]
    with atheris.instrument_imports(include=INSTRUMENT):
        for module in MODULES.get(name, []):
            importlib.import_module(module)
        import fuzz_targets
    harness = fuzz_targets.TARGETS[name]

    def test_one_input(data: bytes) -> None:
        harness(data)  # the verdict is for the smoke test; libFuzzer wants None

    # libFuzzer runs argv[0] again for -merge=1: the wrapper _run() wrote.
    argv0 = os.environ.get("GW_FUZZ_ARGV0", sys.argv[0])
    atheris.Setup([argv0, *libfuzzer_args], test_one_input)
    atheris.Fuzz()


def _stats(output: str) -> dict[str, str]:
    """Executions, coverage and corpus size from libFuzzer's last status lines."""
    stats = {"execs": "?", "cov": "?", "ft": "?", "corp": "?"}
    for line in output.splitlines():
        if m := re.search(r"#(\d+)\s+\w+.*cov: (\d+) ft: (\d+) corp: (\d+)", line):
            stats.update(execs=m[1], cov=m[2], ft=m[3], corp=m[4])
        if m := re.search(r"Done (\d+) runs", line):
            stats["execs"] = m[1]
    return stats


def _run(name: str, args: list[str], log: Path) -> tuple[int, str]:
    wrapper = log.parent / f"{name}.sh"
    wrapper.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --child {name} -- "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "GW_FUZZ_ARGV0": str(wrapper)}
    with log.open("w") as out:
        proc = subprocess.run(
            [str(wrapper), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            check=False,
        )
    return proc.returncode, log.read_text(errors="replace")


def fuzz(name: str, seconds: int, workdir: Path) -> tuple[bool, dict[str, str]]:
    corpus = HERE / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    findings = FINDINGS / name
    findings.mkdir(parents=True, exist_ok=True)
    fresh = workdir / f"{name}-new"
    fresh.mkdir()
    code, output = _run(
        name,
        [
            f"-max_total_time={seconds}",
            "-timeout=20",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={findings}/",
            *_dictionary(name, workdir / f"{name}.dict"),
            str(fresh),
            str(corpus),
        ],
        workdir / f"{name}.log",
    )
    stats = _stats(output)
    ok = code == 0
    if not ok:
        tail = "\n".join(output.splitlines()[-40:])
        print(f"--- {name}: harness failed (exit {code}); input in {findings}/\n{tail}")
    # Keep only what adds coverage: merge the new inputs into a minimal corpus.
    merged = workdir / f"{name}-merged"
    merged.mkdir()
    mcode, _ = _run(name, ["-merge=1", str(merged), str(corpus), str(fresh)], workdir / "m.log")
    if mcode == 0 and any(merged.iterdir()):
        kept = {p.name for p in corpus.iterdir()}
        for path in merged.iterdir():
            if path.name not in kept:
                shutil.copy(path, corpus / path.name)
        # Machine-made inputs the merge dropped go; seeds and named regressions stay.
        keep = {p.name for p in merged.iterdir()}
        for path in corpus.iterdir():
            if re.fullmatch(r"[0-9a-f]{40}", path.name) and path.name not in keep:
                path.unlink()
    stats["corp"] = str(sum(1 for _ in corpus.iterdir()))
    return ok, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a target name, or 'all'")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60)))
    parser.add_argument("--replay", type=Path, help="run one input through the harness")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.target, args.rest)
        return 0
    sys.path[:0] = [str(HERE), str(HERE.parent / "support"), str(ROOT)]
    import fuzz_targets

    if args.replay:
        fuzz_targets.TARGETS[args.target](args.replay.read_bytes())
        print("no finding")
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: `make fuzz` installs it (pip install -e '.[fuzz]')")
        return 2
    names = list(fuzz_targets.TARGETS) if args.target == "all" else [args.target]
    unknown = [n for n in names if n not in fuzz_targets.TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; known: {', '.join(fuzz_targets.TARGETS)}")
    failed = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="gw-fuzz-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            ok, stats = fuzz(name, args.seconds, work)
            if not ok:
                failed.append(name)
            rows.append((name, "FINDING" if not ok else "ok", stats))
            print(
                f"{name:20} {rows[-1][1]:8} execs {stats['execs']:>9}  cov {stats['cov']:>6}"
                f"  ft {stats['ft']:>6}  corpus {stats['corp']:>5}",
                flush=True,
            )
    if failed:
        print(f"findings in {', '.join(failed)}: see {FINDINGS}/", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
