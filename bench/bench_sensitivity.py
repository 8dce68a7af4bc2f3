"""The sensitivity detectors' cost per prompt, by content and size, old and new side by side.

`detect()` runs on the event loop for every request, so its worst case on long prompts is what
matters. This times, in one run and interleaved text by text (so load on the machine hits both
alike):

  * old   bench/sensitivity_before.py: the detectors before the RE2 candidate pass (a regex pass
          for runs of digits and literal searches, then each detector's pattern on windows)
  * new   modelplane_sidecar.routing.classify.sensitivity: one RE2 pass for every detector's
          candidates, the exact pattern and check only at candidate starts

on prose, code, logs, access logs full of IPv4 addresses, JSON, base64, CSV numbers and
multilingual prose (accents, CJK, curly quotes), each at 1, 4, 16 and 32 KB, plus a short chat
prompt. It prints p50 and p99 per cell (microseconds per call, several distinct texts per cell),
the speed-up at p50, and whether old and new found the same labels. Then it times adversarial
texts (64 KB each) built to make a backtracking scan slow.

Times are the calling thread's CPU time by default: how long a call holds the event loop, without
the time the thread sat descheduled, which on a shared machine is most of a wall-clock p99
(--clock wall to see that instead; reading the thread clock adds ~0.3 us per call).

Run: .venv/bin/python bench/bench_sensitivity.py [--samples 300] [--sizes 1,4,16,32] [--clock wall]
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from modelplane_sidecar.routing.classify import sensitivity as new

sys.path.insert(0, str(Path(__file__).resolve().parent))
old = importlib.import_module("sensitivity_before")

Detect = Callable[[str], object]

#: A prose vocabulary: common English words and some of the project's own.
_VOCABULARY = """
the of and to in is that for it as was with be by on not this are or from at which but have an
they you were their has would when if so no will more about can said them what some could into
time only other new than people two may first then these see because way over also after most
through where many should well before must between model router request latency budget policy
cluster endpoint deploy review quarter revenue team customer report analysis market growth
system network service design history science theory
"""
WORDS = _VOCABULARY.split()


def prose(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 22))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(["1998", "40", "3", "250", "1.5"]))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", "?", "!"])
        sentence += " " if rng.random() < 0.85 else "\n\n"
        out.append(sentence)
        length += len(sentence)
    return "".join(out)[:size]


def multilingual(rng: random.Random, size: int) -> str:
    pieces = [
        "Le modèle a répondu « très vite » — mais l'équipe n'était pas sûre. ",
        "Die Größe der Anfrage überschreitet das Budget für Übersetzungen. ",
        "\u201cIt\u2019s fine,\u201d she said \u2014 then checked the dashboards again. ",
        "请将以下段落翻译成英文\uff0c并保持原有的语气和格式。",
        "モデルの応答時間は平均で三百ミリ秒でした。",
        "Отчёт за квартал готов, осталось проверить таблицы. ",
    ]
    out: list[str] = []
    length = 0
    while length < size:
        piece = rng.choice(pieces)
        out.append(piece)
        length += len(piece)
    return "".join(out)[:size]


def code(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        n, f = rng.randint, rng.random
        line = rng.choice(
            [
                f"def handler_{n(0, 9999)}(request, retries={n(1, 9)}, timeout={f() * 9:.2f}):\n",
                f"    for index in range({n(0, 100)}, len(items) - {n(1, 5)}):\n",
                f"        value = matrix[{n(0, 64)}][{n(0, 64)}] * {f():.6f}\n",
                f"    color = 0x{rng.getrandbits(24):06x}  # rgb({n(0, 255)}, {n(0, 255)}, 0)\n",
                f"    assert version >= ({n(0, 3)}, {n(0, 20)}, {n(0, 9)}), 'too old'\n",
                f"  const limit = {n(1000, 99999999)}; // bytes\n",
                f"  if (x.length > {n(10, 4096)} && y !== null) {{ return [{n(0, 9)}, 0]; }}\n",
                f"    return self.cache.get(key, default={n(-5, 5)})\n",
                f"    arr = np.zeros(({n(1, 512)}, {n(1, 512)}), dtype=np.float32)[::-1]\n",
                f"    api_key = os.environ['SERVICE_{n(1, 9)}_API_KEY']\n",
            ]
        )
        out.append(line)
        length += len(line)
    return "".join(out)[:size]


def _timestamp(rng: random.Random) -> str:
    n = rng.randint
    date = f"2024-{n(1, 12):02d}-{n(1, 28):02d}"
    return f"{date}T{n(0, 23):02d}:{n(0, 59):02d}:{n(0, 59):02d}.{n(0, 999):03d}Z"


def _uuid(rng: random.Random) -> str:
    bits = rng.getrandbits
    return f"{bits(32):08x}-{bits(16):04x}-4{bits(12):03x}-{bits(16):04x}-{bits(48):012x}"


def logs(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        n, ts, worker = rng.randint, _timestamp(rng), f"worker-{rng.randint(1, 9)}"
        line = rng.choice(
            [
                f"{ts} INFO {worker} job {n(1000, 99999)} started (size={n(1, 99999)})\n",
                f"{ts} WARN {worker} job {n(1000, 99999)} retry {n(1, 5)} after {n(1, 9999)} ms\n",
                f"{ts} DEBUG trace_id={rng.getrandbits(128):032x} dur={rng.random() * 100:.3f}ms\n",
                f"{ts} ERROR req {_uuid(rng)} failed: status=503 bytes={n(0, 10**7)}\n",
                f"[{n(0, 99999)}.{n(0, 999999):06d}] kernel: mem {n(0, 2**32)} pid {n(1, 65535)}\n",
            ]
        )
        out.append(line)
        length += len(line)
    return "".join(out)[:size]


def ip_logs(rng: random.Random, size: int) -> str:
    """nginx access logs: every line starts with an IPv4 address (a finding, on the first line)."""
    out: list[str] = []
    length = 0
    while length < size:
        n = rng.randint
        ip = ".".join(str(n(1, 254)) for _ in range(4))
        when = f"[01/May/2024:12:{n(0, 59):02d}:{n(0, 59):02d} +0000]"
        status = rng.choice([200, 304, 404])
        line = f'{ip} - - {when} "GET /items/{n(1, 99999)} HTTP/1.1" {status} {n(0, 99999)} "-"\n'
        out.append(line)
        length += len(line)
    return "".join(out)[:size]


def json_records(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        record = {
            "id": rng.randint(1, 10**9),
            "uuid": _uuid(rng),
            "created": _timestamp(rng),
            "price": round(rng.random() * 1000, 2),
            "qty": rng.randint(0, 500),
            "tags": [rng.choice(WORDS) for _ in range(3)],
            "scores": [round(rng.random(), 4) for _ in range(4)],
            "name": " ".join(rng.choice(WORDS) for _ in range(3)),
        }
        line = json.dumps(record) + ",\n"
        out.append(line)
        length += len(line)
    return ("[" + "".join(out))[:size]


def base64_blob(rng: random.Random, size: int) -> str:
    raw = base64.b64encode(rng.randbytes(size)).decode()
    return "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))[:size]


def numbers(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        cells = [
            rng.choice(
                [
                    str(rng.randint(-99999, 999999)),
                    f"{rng.uniform(-1000, 1000):.4f}",
                    f"{rng.random():.6f}",
                    str(rng.randint(0, 9)),
                ]
            )
            for _ in range(8)
        ]
        line = ",".join(cells) + "\n"
        out.append(line)
        length += len(line)
    return "".join(out)[:size]


KINDS: dict[str, Callable[[random.Random, int], str]] = {
    "prose": prose,
    "code": code,
    "logs": logs,
    "ip-logs": ip_logs,
    "json": json_records,
    "base64": base64_blob,
    "numbers": numbers,
    "multilingual": multilingual,
}

SHORT_PROMPT = (
    "Summarise the attached meeting notes in three bullet points and suggest a title. "
    "Keep it under fifty words and use a neutral tone, please."
)

_N = 64 * 1024
ADVERSARIAL: dict[str, str] = {
    "64 KB of digits": "7" * _N,
    "single digits and spaces": "4 " * (_N // 2),
    "cards failing Luhn": "4111 1111 1111 1112 " * (_N // 20),
    "dotted numbers 1.2.3.": "1.2.3." * (_N // 6),
    "plus signs and digits": "+0" * (_N // 2),
    "colons and hex": "a:" * (_N // 2),
    "at signs and local parts": "_a@b.cc " * (_N // 8),
    "an endless domain": "a@" + "b." * (_N // 2),
    "key words": "password=password=" * (_N // 18) + "xxxx",
    "key prefixes": "AKIA sk- ghp_ xoxb- eyJ " * (_N // 24),
}


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _time_pair(
    texts: list[str], samples: int, clock: Callable[[], int]
) -> tuple[list[float], list[float]]:
    """Per-call microseconds of old and new, interleaved text by text."""
    olds: list[float] = []
    news: list[float] = []
    for text in texts:  # warm-up: compiled patterns, RE2's automaton states
        old.detect(text)
        new.detect(text)
    rounds = max(1, samples // len(texts))
    for _ in range(rounds):
        for text in texts:
            started = clock()
            old.detect(text)
            middle = clock()
            new.detect(text)
            olds.append((middle - started) / 1000)
            news.append((clock() - middle) / 1000)
    return olds, news


def _agree(texts: list[str]) -> str:
    differ = sum(old.detect(t) != new.detect(t) for t in texts)
    labels = sorted({d.value for t in texts for d in new.detect(t)})
    return ("same" if differ == 0 else f"{differ} differ") + (
        f" ({', '.join(labels)})" if labels else ""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="timed calls per cell and side")
    parser.add_argument("--sizes", default="1,4,16,32", help="KB, comma-separated")
    parser.add_argument("--texts", type=int, default=6, help="distinct texts per cell")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args(argv)
    clock = time.thread_time_ns if args.clock == "cpu" else time.perf_counter_ns
    sizes = [int(s) for s in args.sizes.split(",")]

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"load average before: {load} on {os.cpu_count()} CPUs (other load inflates p99)")
    print(
        f"{args.samples} timed calls per cell and side, {args.texts} distinct texts per cell, "
        f"{'thread CPU' if args.clock == 'cpu' else 'wall'} time\n"
    )
    print(
        "| content | size | old p50 us | old p99 us | new p50 us | new p99 us | p50 speed-up "
        "| labels old vs new |"
    )
    print("|---|---|---|---|---|---|---|---|")
    olds, news = _time_pair([SHORT_PROMPT], args.samples, clock)
    print(
        f"| chat prompt | {len(SHORT_PROMPT)} B | {statistics.median(olds):.1f} | {_p99(olds):.1f} "
        f"| {statistics.median(news):.1f} | {_p99(news):.1f} "
        f"| {statistics.median(olds) / statistics.median(news):.1f}x | {_agree([SHORT_PROMPT])} |"
    )
    for kind in args.kinds.split(","):
        generate = KINDS[kind]
        for size in sizes:
            rng = random.Random(f"{kind}-{size}")
            texts = [generate(rng, size * 1024) for _ in range(args.texts)]
            olds, news = _time_pair(texts, args.samples, clock)
            print(
                f"| {kind} | {size} KB | {statistics.median(olds):.0f} | {_p99(olds):.0f} "
                f"| {statistics.median(news):.0f} | {_p99(news):.0f} "
                f"| {statistics.median(olds) / statistics.median(news):.0f}x | {_agree(texts)} |"
            )

    print("\n| adversarial text (64 KB) | old us (min of 3) | new us (min of 3) | labels |")
    print("|---|---|---|---|")
    for name, text in ADVERSARIAL.items():
        timings = {}
        for side, detect in (("old", old.detect), ("new", new.detect)):
            runs = []
            for _ in range(3):
                started = clock()
                detect(text)
                runs.append((clock() - started) / 1000)
            timings[side] = min(runs)
        print(f"| {name} | {timings['old']:.0f} | {timings['new']:.0f} | {_agree([text])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
