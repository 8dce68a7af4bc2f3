"""Load benchmark of the sidecar's data plane against a bare proxy and direct calls, in one run.

Starts, as separate processes on 127.0.0.1:
  * a lean OpenAI stand-in upstream (bench/upstream.py)           pinned to CPU 0
  * the real sidecar (`modelplane serve --config <generated>`)    pinned to CPU 1
  * a bare aiohttp pass-through proxy (bench/bare_proxy.py)       pinned to CPU 1
and measures three targets the same way: direct (client -> upstream), bare (client -> bare proxy
-> upstream) and sidecar (client -> sidecar -> upstream), non-streaming and streaming chat, at
concurrency 8 and 32:
  * max throughput with wrk (closed loop, `connections` in flight), pinned to CPU 0;
  * latency at a fixed rate (default 200 req/s) with bench/paced.py (open loop, latency from the
    scheduled send time), pinned to CPU 0.
The proxies get a core of their own so the one under test is what saturates; only one target is
loaded at a time. Prints one side-by-side table, the added latency against direct, and the RSS of
each process after the load. Needs `wrk` on PATH (bench/run.sh installs it from Debian).

With `--compare REV` the sidecar as it was at git revision REV runs beside the current one
(target `before`, its own process on the proxies' core, with that revision's CLI), so a change
is measured against its baseline in the same run.

Run: .venv/bin/python bench/bench_proxy.py   (or `make bench`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SYSTEM = "You are a concise assistant. Answer in one short paragraph and never use lists."
PROMPT = "Explain in two sentences why a per-pod routing sidecar keeps LLM failover fast."

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%(body)s]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"p50_us\\":%%d,\\"p99_us\\":%%d," ..
    "\\"connect\\":%%d,\\"read\\":%%d,\\"write\\":%%d,\\"status\\":%%d,\\"timeout\\":%%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

TARGETS = ("direct", "bare", "sidecar")
#: With --compare: the sidecar at another git revision, measured just before the current one.
BEFORE = "before"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


#: A large prompt like a coding assistant's or a RAG request: prose, code and log lines.
_LONG_PARTS = (
    "The deploy failed after the config change; below are the handler and the worker log. "
    "Find why jobs are retried and suggest a fix that keeps the retry budget.\n",
    "def handle(job, retries=3):\n    for attempt in range(1, retries + 1):\n"
    "        result = run(job, timeout=2.5 * attempt)\n        if result.ok:\n"
    "            return result\n    raise JobFailed(job.id)\n",
    "2024-05-01T12:00:03.114Z INFO worker-3 job 4821 started (queue=default, size=1532)\n"
    "2024-05-01T12:00:05.871Z WARN worker-3 job 4821 attempt 2 after 2500 ms timeout\n",
)


def long_prompt(chars: int) -> str:
    text = "".join(_LONG_PARTS)
    return (text * (chars // len(text) + 1))[:chars]


#: Benchmark modes: request shape (stream?, user prompt) and whether every concurrency runs.
MODES: dict[str, tuple[bool, str, bool]] = {
    "chat": (False, PROMPT, True),
    "stream": (True, PROMPT, True),
    "chat16k": (False, long_prompt(16_000), False),
}


def request_body(model: str, stream: bool, prompt: str = PROMPT) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


def sidecar_config(upstream_port: int) -> str:
    return f"""apiVersion: modelplane.io/v1alpha1
kind: RouterConfig
metadata:
  name: bench
server:
  maxBodyBytes: 1048576
endpoints:
  - name: bench-upstream
    provider: openai
    baseUrl: http://127.0.0.1:{upstream_port}/v1
    model: gpt-4o-mini
    apiKey: {{value: sk-bench-not-a-real-key}}
    pricing: {{inputPerMtok: 0.15, outputPerMtok: 0.60}}
  - name: bench-spare
    provider: openai-compatible
    baseUrl: http://127.0.0.1:{upstream_port}/v1
    model: llama-spare
models:
  - name: bench
    endpoints: [bench-upstream, bench-spare]
"""


def sidecar_at(rev: str, into: Path) -> str:
    """The sidecar and CLI packages as they were at git revision `rev`, unpacked below `into`;
    returns their PYTHONPATH (it shadows the installed working tree's packages, so `modelplane
    serve` runs that revision's CLI too: what it imports is part of the sidecar's memory)."""
    archive = subprocess.run(
        ["git", "archive", rev, "sidecar", "cli"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return os.pathsep.join(str(into / part) for part in ("sidecar", "cli"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (resident), RssAnon (the process's own memory; the rest of the RSS is shared
        library pages, shared by every process that maps the same files) and VmHWM (peak), MB."""
        values = {}
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
        return values

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far, from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def start(
    name: str,
    argv: list[str],
    port: int,
    cpu: int | None,
    logdir: Path,
    env: dict[str, str] | None = None,
) -> Proc:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pinned(cpu),
            cwd=ROOT,
            env=env,
        )
    return Proc(name, popen, port, log)


def wait_listening(proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SystemExit(f"{proc.name} exited at start:\n{proc.log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", proc.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{proc.name} did not listen on port {proc.port} within {timeout:g}s")


def smoke(port: int, body: bytes, stream: bool, name: str) -> None:
    """One real request through `name`; the benchmark refuses to measure a broken path."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    ok = resp.status == 200 and (
        data.rstrip().endswith(b"data: [DONE]") if stream else b'"chat.completion"' in data
    )
    if not ok:
        raise SystemExit(f"smoke request through {name} failed: HTTP {resp.status}: {data[:300]!r}")


@dataclass
class Result:
    mode: str
    conc: int
    target: str
    wrk: dict[str, Any] = field(default_factory=dict)
    paced: dict[str, Any] = field(default_factory=dict)


def run_wrk(port: int, script: Path, conc: int, seconds: float, cpu: int | None) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    ]
    out = subprocess.run(
        argv, capture_output=True, check=True, preexec_fn=pinned(cpu), timeout=seconds + 30
    ).stdout.decode()
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{out}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "seconds": raw["duration_us"] / 1e6,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": errors,
        "non_2xx": raw["status"],
    }


def run_paced(
    port: int, body_file: Path, conc: int, rate: float, seconds: float, cpu: int | None
) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "paced.py"),
        "--port",
        str(port),
        "--body",
        str(body_file),
        "--rate",
        str(rate),
        "--duration",
        str(seconds),
        "--connections",
        str(conc),
    ]
    out = subprocess.run(
        argv, capture_output=True, check=True, preexec_fn=pinned(cpu), timeout=seconds + 60
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(results: list[Result], rate: float) -> str:
    at = f"@{rate:g}/s"
    columns = [
        ("mode", "<7"),
        ("conc", ">4"),
        ("target", "<8"),
        ("|", ""),
        ("max req/s", ">9"),
        ("CPU us/req", ">10"),
        ("busy", ">4"),
        ("p50 ms", ">7"),
        ("p99 ms", ">7"),
        ("err", ">4"),
        ("|", ""),
        (f"{at} p50", ">11"),
        ("p99", ">6"),
        ("added p50", ">9"),
        ("added p99", ">9"),
        ("err", ">4"),
    ]

    def row(values: list[str]) -> str:
        return " ".join(format(v, spec) for v, (_, spec) in zip(values, columns, strict=True))

    head = row([name for name, _ in columns])
    lines = [head, "-" * len(head)]
    by_key = {(r.mode, r.conc, r.target): r for r in results}
    for r in results:
        direct = by_key.get((r.mode, r.conc, "direct"))
        added50 = added99 = None
        if r.target != "direct" and direct is not None:
            added50 = r.paced["p50_ms"] - direct.paced["p50_ms"]
            added99 = r.paced["p99_ms"] - direct.paced["p99_ms"]
        w, p = r.wrk, r.paced
        values = [
            r.mode,
            str(r.conc),
            r.target,
            "|",
            f"{w['rps']:.0f}",
            f"{w['cpu_us_per_req']:.0f}",
            f"{w['busy']:.0%}",
            f"{w['p50_ms']:.2f}",
            f"{w['p99_ms']:.2f}",
            str(w["errors"] + w["non_2xx"]),
            "|",
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
            fmt(added50, "+.2f"),
            fmt(added99, "+.2f"),
            str(p["errors"] + p["non_2xx"]),
        ]
        lines.append(row(values))
        if r.target == "sidecar":
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="sidecar vs bare proxy vs direct, one run")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--paced-duration", type=float, default=5.0, help="seconds per paced run")
    parser.add_argument("--rate", type=float, default=200.0, help="fixed rate for latency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="chat: short prompt; stream: the same, streamed; chat16k: a 16 KB prompt of prose, "
        "code and log lines (first concurrency only)",
    )
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="also run the sidecar as it was at this git revision (target 'before')",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print("wrk not found on PATH: run bench/run.sh (installs it with apt-get)", file=sys.stderr)
        return 2
    two_cores = (os.cpu_count() or 1) >= 2
    load_cpu, proxy_cpu = (0, 1) if two_cores else (None, None)
    python = sys.executable
    modelplane = str(Path(python).parent / "modelplane")

    workdir = Path(tempfile.mkdtemp(prefix="modelplane-bench-"))
    procs: list[Proc] = []
    t0 = time.monotonic()
    try:
        up_port, bare_port, side_port = free_port(), free_port(), free_port()
        config = workdir / "router.yaml"
        config.write_text(sidecar_config(up_port))
        upstream = start(
            "upstream",
            [python, str(HERE / "upstream.py"), "--port", str(up_port)],
            up_port,
            load_cpu,
            workdir,
        )
        procs.append(upstream)
        bare = start(
            "bare",
            [
                python,
                str(HERE / "bare_proxy.py"),
                "--port",
                str(bare_port),
                "--upstream",
                f"http://127.0.0.1:{up_port}",
            ],
            bare_port,
            proxy_cpu,
            workdir,
        )
        procs.append(bare)
        sidecar = start(
            "sidecar",
            [
                modelplane,
                "serve",
                "--config",
                str(config),
                "--port",
                str(side_port),
                "--log-level",
                "warning",
            ],
            side_port,
            proxy_cpu,
            workdir,
        )
        procs.append(sidecar)
        ports = {"direct": up_port, "bare": bare_port, "sidecar": side_port}
        by_target = {"direct": upstream, "bare": bare, "sidecar": sidecar}
        models = {"direct": "gpt-4o-mini", "bare": "gpt-4o-mini", "sidecar": "bench"}
        targets: tuple[str, ...] = TARGETS
        if args.compare:
            ports[BEFORE] = before_port = free_port()
            env = {**os.environ, "PYTHONPATH": sidecar_at(args.compare, workdir / "rev")}
            argv = [modelplane, "serve", "--config", str(config), "--port", str(before_port)]
            by_target[BEFORE] = start(
                BEFORE, [*argv, "--log-level", "warning"], before_port, proxy_cpu, workdir, env
            )
            procs.append(by_target[BEFORE])
            models[BEFORE] = "bench"
            targets = ("direct", "bare", BEFORE, "sidecar")
        for p in procs:
            wait_listening(p)

        results: list[Result] = []
        cells: list[tuple[str, int]] = []
        for mode in args.modes:
            stream, prompt, every_concurrency = MODES[mode]
            files: dict[str, tuple[Path, Path]] = {}
            for target in targets:
                body = request_body(models[target], stream, prompt)
                smoke(ports[target], body, stream, target)
                body_file = workdir / f"{mode}-{target}.json"
                body_file.write_bytes(body)
                script = workdir / f"{mode}-{target}.lua"
                script.write_text(WRK_SCRIPT % {"body": body.decode()})
                files[target] = (body_file, script)
                run_wrk(ports[target], script, 8, 1, load_cpu)  # warm-up
            for conc in args.concurrency if every_concurrency else args.concurrency[:1]:
                cells.append((mode, conc))
                for target in targets:
                    body_file, script = files[target]
                    print(f"  {mode:<6} c={conc:<3} {target:<8} ...", file=sys.stderr, flush=True)
                    r = Result(mode, conc, target)
                    served_by = by_target[target]
                    cpu_before = served_by.cpu_seconds()
                    r.wrk = run_wrk(ports[target], script, conc, args.duration, load_cpu)
                    cpu = served_by.cpu_seconds() - cpu_before
                    r.wrk["cpu_us_per_req"] = cpu / max(1, r.wrk["requests"]) * 1e6
                    r.wrk["busy"] = cpu / r.wrk["seconds"]
                    r.paced = run_paced(
                        ports[target], body_file, conc, args.rate, args.paced_duration, load_cpu
                    )
                    results.append(r)

        memory = {p.name: p.memory_mb() for p in procs}
        elapsed = time.monotonic() - t0
        print()
        print(
            f"modelplane sidecar data-plane benchmark ({os.cpu_count()} CPUs; "
            f"proxies on CPU {proxy_cpu}, upstream + load generators on CPU {load_cpu}; "
            f"wrk {args.duration:g}s closed-loop per cell, then {args.rate:g} req/s open-loop "
            f"for {args.paced_duration:g}s)"
        )
        print(render(results, args.rate))
        print(
            "max req/s, CPU us/req, busy: wrk closed loop; CPU and busy are those of the process "
            "serving the target\n(the upstream for direct, else the proxy): busy near 100% means "
            "it was the bottleneck. added = p50/p99 minus direct's."
        )
        for mode, conc in cells:
            cell = {r.target: r for r in results if r.mode == mode and r.conc == conc}
            s, b = cell["sidecar"].wrk, cell["bare"].wrk
            s_core = 1e6 / s["cpu_us_per_req"]
            b_core = 1e6 / b["cpu_us_per_req"]
            print(
                f"{mode:<7} c={conc:<3} sidecar = {s['rps'] / b['rps']:.0%} of the bare "
                f"proxy's measured req/s ({s['rps']:.0f} vs {b['rps']:.0f}); by CPU per "
                f"request, one core serves {s_core:.0f} vs {b_core:.0f} req/s "
                f"({s_core / b_core:.0%})"
            )
            if BEFORE in cell:
                was = cell[BEFORE].wrk["cpu_us_per_req"]
                print(
                    f"{'':<7} {'':<5} sidecar vs before ({args.compare}): CPU per request "
                    f"{was:.0f} -> {s['cpu_us_per_req']:.0f} us "
                    f"({s['cpu_us_per_req'] / was - 1:+.0%})"
                )
        print()
        for name in ("sidecar", BEFORE, "bare", "upstream"):
            if name not in memory:
                continue
            m = memory[name]
            print(
                f"memory after load  {name:<8} RSS {m['VmRSS']:5.1f} MB  (own/anonymous "
                f"{m['RssAnon']:5.1f} MB, peak RSS {m['VmHWM']:5.1f} MB)"
            )
        print(f"\nwhole run: {elapsed:.0f}s")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "results": [r.__dict__ for r in results],
                        "memory_mb": memory,
                        "rate": args.rate,
                    },
                    indent=2,
                )
            )
        bad = [
            r
            for r in results
            if r.wrk["errors"] or r.wrk["non_2xx"] or r.paced["errors"] or r.paced["non_2xx"]
        ]
        if bad:
            print(f"WARNING: {len(bad)} cell(s) saw errors or non-2xx answers", file=sys.stderr)
            return 1
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
