"""How long until a dead peer is noticed: tether's liveness against plain TCP, on hosts
made of network namespaces (tests/hosts/rig.py; needs root with CAP_NET_ADMIN).

    .venv/bin/python bench/faults.py --quick                  # ~2 min: T = 1 s, 3 trials
    .venv/bin/python bench/faults.py                          # ~10 min: T = 0.2, 1, 5 s
    .venv/bin/python bench/faults.py --out docs/faults.jsonl --plot docs/faults.png \\
        --docs docs/faults.md                                 # and render the PNG + table
    .venv/bin/python bench/faults.py --from docs/faults.jsonl --plot docs/faults.png \\
        --docs docs/faults.md                                 # re-render only

Detection scenarios, each a fault on the server's host right after an exchange, while
the client is blocked in a read (`--trials` times each):

* silent peer -- nft DROP of everything in and out of the server's host (interface
  up: no RST, no FIN, no ICMP);
* killed peer -- SIGKILL of the server process (its kernel closes its sockets);
* cut link -- the server's link set down at the switch end (the carrier is gone).

Subjects: tether (examples/oecho.py client and server through a `tether gateway` on a
third host, the flow's liveness T; the time until the client's read raises), and plain
TCP between the client's and the server's hosts (the rig's `tcpwait` tool: one line
each way, then a blocked recv()), with the kernel's defaults, with TCP_USER_TIMEOUT =
T only, and with keepalive tuned to T (TCP_KEEPIDLE = max(1, T/2), TCP_KEEPINTVL =
max(1, T/4), TCP_KEEPCNT = 2: the kernel counts these in whole seconds) plus
TCP_USER_TIMEOUT = T. A recv that has not returned after `--bound` seconds is
reported as ">BOUND s".

False positives (`loss`): the same pairs, idle, over a link dropping 20% of the packets
(nft numgen) and delaying them by 200 ms ± 50 ms each way (a packet delay line: the
TCP connections see it in their RTT) for `--idle` seconds: how many tether flows go
DOWN, and how many tuned TCP connections the kernel aborts, although both ends are
alive.

One JSON object per line on stdout (`bench`, `scenario`, `subject`, `timeout`, and
`p50`/`p99`/`max` in seconds over the trials, or `undetected`, `bound`, or `down`/`of`
for false positives). Numbers are for information only; no test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hosts.rig import HostProc, Rig, netns_unavailable  # noqa: E402

SCENARIOS = ("silent peer", "killed peer", "cut link")
SECOND_READ = re.compile(r"^second read: (?P<what>.*?) after=(?P<after>[\d.]+)s")
DOCS_BEGIN = "<!-- bench/faults.py: begin -->"
DOCS_END = "<!-- bench/faults.py: end -->"


def emit(result: dict[str, Any]) -> dict[str, Any]:
    line = {"bench": "faults", **result}
    print(json.dumps(line), flush=True)
    return line


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(samples: list[float | None]) -> dict[str, Any]:
    seen = [s for s in samples if s is not None]
    out: dict[str, Any] = {"trials": len(samples), "undetected": len(samples) - len(seen),
                           "samples": [None if s is None else round(s, 4) for s in samples]}
    if seen:
        out.update(p50=round(percentile(seen, 50), 4), p99=round(percentile(seen, 99), 4),
                   max=round(max(seen), 4))
    return out


def keepalive_for(timeout: float) -> tuple[int, int, int]:
    """TCP keepalive (idle, interval, count) aimed at `timeout`, in the kernel's units."""
    return max(1, int(timeout / 2)), max(1, int(timeout / 4)), 2


def inject(rig: Rig, scenario: str, server: HostProc) -> float:
    if scenario == "silent peer":
        return rig["server"].silence()
    if scenario == "killed peer":
        return server.kill()
    if scenario == "cut link":
        return rig["server"].link_down()
    raise ValueError(scenario)


def tether_trial(rig: Rig, scenario: str, timeout: float) -> tuple[float | None, str]:
    """One oecho exchange, the fault, and the time until the client's read failed."""
    try:
        gw = rig["gw"].gateway()
        server = rig["server"].oecho_server(gw, hold=True, liveness=timeout)
        client = rig["client"].oecho_client(gw, liveness=timeout)
        client.expect(r"^reply: ")
        at = inject(rig, scenario, server)
        _, line = client.expect(r"^second read: ", timeout=timeout + 30)
        match = SECOND_READ.match(line.text)
        return line.t - at, match["what"] if match else line.text
    finally:
        rig.reset()


def tcp_trial(rig: Rig, scenario: str, variant: str, timeout: float,
              bound: float) -> tuple[float | None, str]:
    """Plain TCP: one line each way, the fault, then how long the blocked recv() took."""
    try:
        echo = rig["server"].echo_server()
        args = ["--connect", echo.address, "--bound", str(bound)]
        if variant in ("user timeout", "keepalive + user timeout"):
            args += ["--user-timeout", str(max(1, round(timeout * 1000)))]
        if variant == "keepalive + user timeout":
            args += ["--keepalive", ",".join(map(str, keepalive_for(timeout)))]
        client = rig["client"].tool("tcp", "tcpwait", *args)
        client.expect(r"^reply: ")
        at = inject(rig, scenario, echo.proc)
        _, line = client.expect(r"^second read: ", timeout=bound + 30)
        match = SECOND_READ.match(line.text)
        what = match["what"] if match else line.text
        return (None if what == "bound" else line.t - at), what
    finally:
        rig.reset()


def detection(rig: Rig, timeouts: Iterable[float], trials: int, bound: float,
              tcp_trials: int) -> list[dict[str, Any]]:
    results = []
    for timeout in timeouts:
        for scenario in SCENARIOS:
            samples, outcomes = [], set()
            for _ in range(trials):
                latency, what = tether_trial(rig, scenario, timeout)
                samples.append(latency)
                outcomes.add(re.sub(r" after=.*", "", what))
            results.append(emit({"scenario": scenario, "subject": "tether", "timeout": timeout,
                                 "outcome": sorted(outcomes), **summarize(samples)}))
            for variant in ("default", "user timeout", "keepalive + user timeout"):
                if variant != "keepalive + user timeout" and timeout != min(timeouts):
                    continue  # a blocked reader never sees these fire: measured once
                samples, outcomes = [], set()
                for _ in range(tcp_trials):
                    latency, what = tcp_trial(rig, scenario, variant, timeout, bound)
                    samples.append(latency)
                    outcomes.add(what)
                extra: dict[str, Any] = {}
                if variant != "default":
                    extra["user_timeout_ms"] = max(1, round(timeout * 1000))
                if variant == "keepalive + user timeout":
                    extra["keepalive"] = keepalive_for(timeout)
                results.append(emit({"scenario": scenario, "subject": f"tcp {variant}",
                                     "timeout": None if variant == "default" else timeout,
                                     "bound": bound, "outcome": sorted(outcomes), **extra,
                                     **summarize(samples)}))
    return results


def false_positives(rig: Rig, timeout: float, idle: float, n: int, loss: int,
                    delay: float, jitter: float) -> list[dict[str, Any]]:
    """`n` idle tether flows and `n` tuned TCP connections over one link losing `loss`%
    of its packets each way and delaying them by `delay` ± `jitter` each way (a packet
    delay line on the server's host): how many end although both ends are alive. The
    gateway and the oecho server share the server's host, so both subjects cross the
    same single link, and tether's link is the TCP connection that sees the delay and
    the loss."""
    try:
        if delay or jitter:
            rig["server"].delay(delay, jitter, seed=round(timeout * 1000))
        gw = rig["server"].gateway()
        rig["server"].oecho_server(gw, hold=True, liveness=timeout)
        echo = rig["server"].echo_server()
        flows = [rig["client"].oecho_client(gw, name=f"flow{i}", liveness=timeout)
                 for i in range(n)]
        ka = ",".join(map(str, keepalive_for(timeout)))
        conns = [rig["client"].tool(f"tcp{i}", "tcpwait", "--connect", echo.address,
                                    "--bound", str(idle + 5), "--keepalive", ka,
                                    "--user-timeout", str(round(timeout * 1000)))
                 for i in range(n)]
        for proc in (*flows, *conns):
            proc.expect(r"^reply: ")
        start = rig["client"].loss(loss)
        rig["server"].loss(loss)
        time.sleep(idle)
        end = time.monotonic()
        down = [ln for p in flows for ln in p.lines("stdout")
                if ln.text.startswith("second read: ") and start <= ln.t <= end]
        aborted = [ln for p in conns for ln in p.lines("stdout")
                   if ln.text.startswith("second read: ") and start <= ln.t <= end]
    finally:
        rig.reset()
    scenario = f"{loss}% loss" + (f", {delay * 1000:g}±{jitter * 1000:g} ms"
                                  if delay or jitter else "")
    common = {"scenario": scenario, "timeout": timeout, "seconds": idle, "of": n}
    return [emit({**common, "subject": "tether", "down": len(down),
                  "after": sorted(round(ln.t - start, 2) for ln in down)}),
            emit({**common, "subject": "tcp keepalive + user timeout", "down": len(aborted),
                  "keepalive": keepalive_for(timeout),
                  "user_timeout_ms": round(timeout * 1000),
                  "after": sorted(round(ln.t - start, 2) for ln in aborted)})]


# rendering -----------------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def markdown(results: list[dict[str, Any]]) -> str:
    rows = ["| scenario | subject | timeout T | p50 | p99 | max | n | not noticed |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "down" in r:
            continue
        timeout = "-" if r["timeout"] is None else f"{r['timeout']:g} s"
        missed = r["undetected"]
        missed_text = f"{missed} (> {r['bound']:g} s)" if missed else "0"
        rows.append(f"| {r['scenario']} | {r['subject']} | {timeout} | {_fmt(r.get('p50'))} | "
                    f"{_fmt(r.get('p99'))} | {_fmt(r.get('max'))} | {r['trials']} | "
                    f"{missed_text} |")
    fp = [r for r in results if "down" in r]
    if fp:
        rows += ["", "| false positives | subject | timeout T | idle | ended, of |",
                 "|---|---|---|---|---|"]
        for r in fp:
            rows.append(f"| {r['scenario']} | {r['subject']} | {r['timeout']:g} s | "
                        f"{r['seconds']:g} s | {r['down']} of {r['of']} |")
    return "\n".join(rows)


def write_docs(path: Path, results: list[dict[str, Any]], command: str) -> None:
    table = (f"{DOCS_BEGIN}\n_Generated by `{command}`; raw results in the JSON lines it "
             f"printed._\n\n{markdown(results)}\n{DOCS_END}")
    text = path.read_text() if path.exists() else ""
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        text = head + table + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    path.write_text(text)


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    """Detection latency per scenario and subject (log scale; a triangle at the bound for
    a fault never noticed), and the false positives."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("the plot needs matplotlib (.venv/bin/pip install matplotlib); "
                 "the results above are complete without it")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detect = [r for r in results if "samples" in r]
    fp = [r for r in results if "down" in r]
    fig, axes = plt.subplots(1, 2 if fp else 1, figsize=(13 if fp else 9, 0.32 * len(detect)
                                                          + 2.2),
                             gridspec_kw={"width_ratios": [3, 1]} if fp else None,
                             squeeze=False)
    ax = axes[0][0]
    colors = {"tether": "tab:blue", "tcp default": "tab:gray", "tcp user timeout": "tab:orange",
              "tcp keepalive + user timeout": "tab:red"}
    labels = []
    for y, r in enumerate(detect):
        timeout = "" if r["timeout"] is None else f", T={r['timeout']:g}s"
        labels.append(f"{r['scenario']}: {r['subject']}{timeout}")
        color = colors.get(r["subject"], "black")
        seen = [s for s in r["samples"] if s is not None]
        ax.scatter([max(s, 1e-3) for s in seen], [y] * len(seen), s=18, color=color,
                   alpha=0.7, zorder=3)
        if r["undetected"]:
            ax.scatter([r["bound"]], [y], marker=">", s=60, color=color, zorder=3)
            ax.annotate(f"{r['undetected']}x > {r['bound']:g}s", (r["bound"], y),
                        xytext=(6, -3), textcoords="offset points", fontsize=7)
        if r["timeout"]:
            ax.plot([r["timeout"], r["timeout"]], [y - 0.4, y + 0.4], color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(detect)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time to notice the fault (s, log); black tick: the configured timeout T")
    ax.set_title("Detection latency: tether liveness vs plain TCP")
    ax.grid(axis="x", which="both", alpha=0.3)
    if fp:
        ax2 = axes[0][1]
        names = [f"{r['subject']}\nT={r['timeout']:g}s" for r in fp]
        ax2.barh(range(len(fp)), [r["down"] / r["of"] for r in fp],
                 color=[colors.get(r["subject"], "tab:red") for r in fp])
        ax2.set_yticks(range(len(fp)), names, fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlim(0, 1)
        ax2.set_xlabel("share ended although alive")
        ax2.set_title(f"False positives\n({fp[0]['scenario']}, {fp[0]['seconds']:g}s idle)",
                      fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="T = 1 s, 3 trials, TCP bound 10 s, 20 s of loss")
    parser.add_argument("--timeouts", default=None, help="liveness timeouts T, e.g. 0.2,1,5")
    parser.add_argument("--trials", type=int, default=None, help="tether trials per case")
    parser.add_argument("--tcp-trials", type=int, default=None, help="TCP trials per case")
    parser.add_argument("--bound", type=float, default=None,
                        help="give up on a blocked TCP recv() after this long (s)")
    parser.add_argument("--idle", type=float, default=None, help="seconds of loss")
    parser.add_argument("--loss", type=int, default=20, help="percent (false positives)")
    parser.add_argument("--delay", type=float, default=0.2,
                        help="seconds each way on the lossy link (false positives)")
    parser.add_argument("--jitter", type=float, default=0.05,
                        help="± seconds on that delay (false positives)")
    parser.add_argument("--fp-timeouts", default=None,
                        help="timeouts for the false-positive runs, e.g. 2,5,12")
    parser.add_argument("--only", default="detection,loss",
                        help="detection and/or loss")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--from", dest="source", type=Path,
                        help="do not measure: render the results of an earlier --out")
    parser.add_argument("--plot", type=Path, help="render the PNG here (needs matplotlib)")
    parser.add_argument("--docs", type=Path,
                        help="write the table into this markdown file, between markers")
    args = parser.parse_args()
    quick = args.quick
    timeouts = [float(t) for t in (args.timeouts or ("1" if quick else "0.2,1,5")).split(",")]
    fp_timeouts = [float(t) for t in (args.fp_timeouts or ("2" if quick else "2,5,12")).split(",")]
    trials = args.trials or (3 if quick else 10)
    tcp_trials = args.tcp_trials or (1 if quick else 3)
    bound = args.bound or (10.0 if quick else 30.0)
    idle = args.idle or (20.0 if quick else 60.0)
    command = "python bench/faults.py " + " ".join(sys.argv[1:])

    if args.source is not None:
        results = [json.loads(line) for line in args.source.read_text().splitlines()
                   if line.startswith("{")]
    else:
        reason = netns_unavailable()
        if reason is not None:
            print(json.dumps({"bench": "faults", "skipped": reason}))
            return 2
        results = []
        with Rig(["client", "gw", "server"]) as rig:
            if "detection" in args.only:
                results += detection(rig, timeouts, trials, bound, tcp_trials)
            if "loss" in args.only:
                for timeout in fp_timeouts:
                    results += false_positives(rig, timeout, idle, 8, args.loss,
                                               args.delay, args.jitter)
        if args.out:
            args.out.write_text("".join(json.dumps(r) + "\n" for r in results))
    if args.docs:
        write_docs(args.docs, results, command)
    if args.plot:
        plot(args.plot, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
