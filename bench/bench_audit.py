"""What the audit trail costs: the same sidecar with and without `--audit-log`, in one run.

Starts the lean upstream (bench/upstream.py) and two real sidecars on the same config, one plain
and one with `--audit-log FILE --audit-checkpoint-every 100`, and loads each in turn with wrk
(closed loop, non-streaming and streaming chat). Prints req/s, p50/p99 and the sidecar's CPU time
per request side by side, then verifies the audit file it wrote (`modelplane audit verify`) and
checks it holds one record per request answered.

Run: .venv/bin/python bench/bench_audit.py [--duration 4] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from bench_proxy import (
    HERE,
    WRK_SCRIPT,
    Proc,
    free_port,
    request_body,
    run_wrk,
    sidecar_config,
    smoke,
    start,
    wait_listening,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per target")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found on PATH: run bench/run.sh (installs it with apt-get)", file=sys.stderr)
        return 2
    two_cores = (os.cpu_count() or 1) >= 2
    load_cpu, proxy_cpu = (0, 1) if two_cores else (None, None)
    modelplane = str(Path(sys.executable).parent / "modelplane")
    workdir = Path(tempfile.mkdtemp(prefix="modelplane-bench-audit-"))
    audit_file = workdir / "audit.jsonl"
    procs: list[Proc] = []
    try:
        up_port = free_port()
        config = workdir / "router.yaml"
        config.write_text(sidecar_config(up_port))
        upstream = start(
            "upstream",
            [sys.executable, str(HERE / "upstream.py"), "--port", str(up_port)],
            up_port,
            load_cpu,
            workdir,
        )
        procs.append(upstream)
        sidecars: dict[str, Proc] = {}
        for name, extra in (
            ("plain", []),
            ("audit", ["--audit-log", str(audit_file), "--audit-checkpoint-every", "100"]),
        ):
            port = free_port()
            argv = [modelplane, "serve", "--config", str(config), "--port", str(port)]
            sidecars[name] = start(
                name, [*argv, "--log-level", "warning", *extra], port, proxy_cpu, workdir
            )
            procs.append(sidecars[name])
        for proc in procs:
            wait_listening(proc)

        rows: list[tuple[str, str, dict[str, float]]] = []
        answered = 0
        for mode in ("chat", "stream"):
            body = request_body("bench", mode == "stream")
            script = workdir / f"{mode}.lua"
            script.write_text(WRK_SCRIPT % {"body": body.decode()})
            totals: dict[str, dict[str, float]] = {}
            for name, proc in sidecars.items():
                smoke(proc.port, body, mode == "stream", name)
                answered += name == "audit"
                warm = run_wrk(proc.port, script, 4, 1, load_cpu)
                answered += warm["requests"] if name == "audit" else 0
                totals[name] = {"requests": 0, "seconds": 0.0, "cpu": 0.0, "p50": 0.0, "p99": 0.0}
            for _ in range(args.rounds):
                for name, proc in sidecars.items():
                    print(f"  {mode:<6} {name:<6} ...", file=sys.stderr, flush=True)
                    before = proc.cpu_seconds()
                    result = run_wrk(proc.port, script, args.concurrency, args.duration, load_cpu)
                    t = totals[name]
                    t["cpu"] += proc.cpu_seconds() - before
                    t["requests"] += result["requests"]
                    t["seconds"] += result["requests"] / result["rps"]
                    t["p50"] += result["p50_ms"] / args.rounds
                    t["p99"] += result["p99_ms"] / args.rounds
                    if result["errors"] or result["non_2xx"]:
                        raise SystemExit(f"{name}: {result}")
                    if name == "audit":
                        answered += result["requests"]
            for name in sidecars:
                rows.append((mode, name, totals[name]))

        sidecars["audit"].stop()  # closes the log: a final signed checkpoint
        print()
        print(
            f"audit trail cost ({os.cpu_count()} CPUs; sidecars on CPU {proxy_cpu}, upstream and "
            f"wrk on CPU {load_cpu}; c={args.concurrency}, {args.rounds} x {args.duration:g}s "
            "per cell, alternating)"
        )
        head = (
            f"{'mode':<7} {'sidecar':<8} {'req/s':>8} {'CPU us/req':>11} {'p50 ms':>7} "
            f"{'p99 ms':>7}"
        )
        print(head)
        print("-" * len(head))
        for mode, name, t in rows:
            rps = t["requests"] / t["seconds"]
            cpu_us = t["cpu"] / t["requests"] * 1e6
            print(
                f"{mode:<7} {name:<8} {rps:>8.0f} {cpu_us:>11.0f} {t['p50']:>7.2f} {t['p99']:>7.2f}"
            )
        size = audit_file.stat().st_size
        verify = subprocess.run(
            [modelplane, "audit", "verify", str(audit_file), "--strict", "--json"],
            capture_output=True,
            check=False,
        )
        report = orjson.loads(verify.stdout)
        print(
            f"\naudit file: {report['records']} records (wrk counted {int(answered)} answers; "
            "requests in flight when wrk stops are answered and recorded too), "
            f"{report['checkpoints']} checkpoints, {size / max(1, report['records']):.0f} bytes "
            f"per record; verify --strict: {'intact' if report['ok'] else report['problems'][:3]}"
        )
        return 0 if report["ok"] and report["records"] >= answered else 1
    finally:
        for proc in procs:
            proc.stop()
        time.sleep(0.1)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
