#!/usr/bin/env python3
"""Turn a bench/repl.sh run directory into one Markdown report.

    repl_report.py RUNDIR             print the report (header, table, notes)
    repl_report.py --get FILE KEY...  fields of a `replication status VM --json`
                                      file, space separated (KEY: state,
                                      metrics.lag_seconds, ...)
    repl_report.py --fio FILE KEY...  write figures of a fio JSON result

RUNDIR holds `meta` (key=value lines), per part a PART.kv (key=value), an
optional PART.notes and PART.failed, fio JSON results (PART-NAME.json) and
status snapshots (PART-*.json), lag-samples.txt and tls.txt. Part 1's
sustained loads are sustain.kv, sustain-KIND.json and sustain-KIND-samples.txt.
"""
import json
import os
import re
import statistics
import sys

MiB = 1 << 20
KEEP_UP = 0.9  # apply keeps up when it reaches this share of the write rate
TLS_GOAL = 0.9  # encryption costs less than 10%


def read_lines(path):
    try:
        with open(path) as f:
            return [l.rstrip("\n") for l in f if l.strip()]
    except OSError:
        return []


def read_kv(path):
    out = {}
    for line in read_lines(path):
        k, _, v = line.partition("=")
        out[k] = v
    return out


def load_json(path):
    """A JSON document, tolerating log lines printed before it (fio)."""
    with open(path) as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON")
    return json.loads(text[start:])


def status_field(st, key):
    v = st
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def primary(path):
    """The primary's status of the one VM in a status file, or None."""
    try:
        return load_json(path)["primaries"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def fio_write(path):
    try:
        return load_json(path)["jobs"][0]["write"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def seconds(d):
    """A Go duration like 30s, 5m, 1m30s in seconds."""
    total, n = 0.0, 0
    for num, unit in re.findall(r"([0-9.]+)(h|ms|m|s)", d or ""):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
        n += 1
    return total if n else None


def mib(b):
    return f"{b / MiB:,.1f} MiB" if b < 10 * MiB else f"{b / MiB:,.0f} MiB"


def rate(b, s):
    return f"{b / MiB / s:,.0f} MiB/s" if s else "—"


def delta(before, after, key):
    if before is None or after is None:
        return None
    a, b = status_field(after, key), status_field(before, key)
    return None if a is None or b is None else a - b


def cycles_of(n):
    return "? cycles" if n is None else f"{n} cycle{'' if n == 1 else 's'}"


def ok(good):
    return "✅" if good else "❌"


class Report:
    def __init__(self, run):
        self.run = run
        self.meta = read_kv(os.path.join(run, "meta"))
        self.rows = []  # (section, measurement, result, comparison, verdict)
        self.notes = []
        self.targets = []
        self.apply_rate = None  # MiB/s of the sequential apply, for the TLS note

    def path(self, name):
        return os.path.join(self.run, name)

    def kv(self, part):
        return read_kv(self.path(part + ".kv"))

    def ran(self, part):
        return part in self.meta.get("parts", "").split()

    def failed(self, part):
        return os.path.exists(self.path(part + ".failed"))

    def row(self, *cells):
        self.rows.append(cells)

    def missing(self, section, what):
        why = "failed (see the run directory)" if self.failed(what) else "not run"
        self.row(section, f"part `{what}`", why, "", "")

    # 1 -----------------------------------------------------------------
    def apply(self):
        kv = self.kv("apply")
        freq = self.meta.get("apply_frequency", "?")
        for kind, label in (("seq", "sequential 1M writes, QD4"), ("rand", "random 4k writes, QD16")):
            sec = "1 apply rate"
            w = fio_write(self.path(f"apply-{kind}.json"))
            if w is None or f"{kind}.total_s" not in kv:
                self.row(sec, f"{label}", "failed" if self.failed("apply") else "not run", "", "")
                continue
            size, total, sync = int(kv[f"{kind}.size"]), float(kv[f"{kind}.total_s"]), float(kv[f"{kind}.sync_s"])
            write_rate = w["bw_bytes"] / MiB
            applied = size / MiB / total
            before, after = primary(self.path(f"apply-{kind}-before.json")), primary(self.path(f"apply-{kind}-after.json"))
            wire = delta(before, after, "metrics.cycle_wire_bytes_total")
            cycles = delta(before, after, "metrics.cycles_shipped_total")
            if kind == "seq":
                self.apply_rate = applied
            ident = kv.get(f"apply-{kind}.identical", "?")
            # A burst lands in the page cache in a second or two, faster
            # than any rate the primary can sustain: these rows say how fast
            # a backlog drains; the target is the sustained load's.
            self.row(sec, f"burst: {mib(size)} {label}: primary write rate (fio)", f"{write_rate:,.0f} MiB/s",
                     f"{mib(size)} in {float(kv[f'{kind}.write_s']):.1f} s", "")
            self.row(sec, f"… applied on the replica: bytes / (first write → `replication sync` done)",
                     f"{applied:,.0f} MiB/s", f"{total:.1f} s in all; {applied / write_rate:.2f}× the burst's rate", "")
            self.row(sec, "… sync only (writes done → applied): time, and the rate the replica drained the backlog",
                     f"{sync:.1f} s ({rate(size, sync)})",
                     f"wire {mib(wire) if wire is not None else '?'} in {cycles_of(cycles)} "
                     f"(every {freq}, compression off); replica identical: {ident}", "")

    def sustained(self):
        """Part 1's sustained loads: fio time_based, status sampled."""
        kv = self.kv("sustain")
        freq = self.meta.get("apply_frequency", "?")
        sec = "1 apply rate"
        for kind, label in (("seq", "sequential 1M writes, QD4"), ("rand", "random 4k writes, QD16")):
            w = fio_write(self.path(f"sustain-{kind}.json"))
            if w is None or f"{kind}.t0" not in kv:
                self.row(sec, f"sustained {label}", "failed" if self.failed("apply") else "not run", "", "")
                continue
            disk, secs, t0 = int(kv[f"{kind}.disk"]), kv[f"{kind}.seconds"], float(kv[f"{kind}.t0"])
            write_s = float(kv[f"{kind}.write_s"])
            overflow = kv.get(f"{kind}.overflow") == "1"
            guest = w["io_bytes"]
            write_rate = w["bw_bytes"] / MiB
            before, after = primary(self.path(f"sustain-{kind}-before.json")), primary(self.path(f"sustain-{kind}-after.json"))
            samples = []  # time, lag, state, health, applied cycle, pending, wire bytes
            for line in read_lines(self.path(f"sustain-{kind}-samples.txt")):
                f = line.split()
                if len(f) >= 7 and float(f[0]) >= t0:
                    samples.append((float(f[0]), float(f[1]), f[2], f[3], int(f[4]), int(f[5]), int(f[6])))
            self.row(sec, f"sustained: {secs} s of {label} over a {mib(disk)} disk (fio time_based), cycles every {freq}, "
                          f"compression off: primary write rate (fio)", f"{write_rate:,.0f} MiB/s",
                     f"{mib(guest)} written in {write_s:.1f} s", "")
            # Wire bytes the replica applied while fio wrote: from the
            # samples taken during the run.
            wire0 = status_field(before, "metrics.cycle_wire_bytes_total") if before else None
            during = [x for x in samples if x[0] <= t0 + write_s and x[2] != "resync-required"]
            if wire0 is not None and during:
                last = during[-1]
                self.row(sec, "… applied on the replica while fio wrote: wire bytes of the cycles committed (coalesced) / time",
                         rate(last[6] - wire0, last[0] - t0),
                         f"{mib(last[6] - wire0)} in {last[0] - t0:.0f} s, up to cycle {last[4]}", "")
            if overflow:
                first = next((x for x in samples if x[2] == "resync-required"), None)
                when = f" after {first[0] - t0:.0f} s" if first else ""
                self.row(sec, "… caught up on the replica: guest bytes / (first write → `replication sync` done)", "—",
                         f"fell behind until the journal passed its cap{when}: resync required", "❌ apply keeps up: no")
                self.targets.append(f"apply keeps up with {secs} s of sustained {label}: no, the journal passed its "
                                    f"cap{when} ❌")
            else:
                total, sync = float(kv[f"{kind}.total_s"]), float(kv[f"{kind}.sync_s"])
                caught = guest / MiB / total
                wire = delta(before, after, "metrics.cycle_wire_bytes_total")
                cycles = delta(before, after, "metrics.cycles_shipped_total")
                missed = delta(before, after, "metrics.cycles_missed_total")
                self.row(sec, "… caught up on the replica: guest bytes / (first write → `replication sync` done)",
                         f"{caught:,.0f} MiB/s", f"{total:.1f} s in all, sync only {sync:.1f} s; "
                         f"{caught / write_rate:.2f}× the write rate (a window with a fixed start and end: the "
                         f"first cycle holds the page-cache burst, the last one the sync); wire {mib(wire or 0)} "
                         f"in {cycles_of(cycles)}, {missed} missed; replica identical: "
                         f"{kv.get(f'sustain-{kind}.identical', '?')}", "")
                # Steady state: a replica applying at a fraction f of the
                # write rate sees its lag grow by (1 - f) s every second.
                # The slope of lag over time after the first cycle (a
                # least-squares fit) gives f without the window's ends.
                first = samples[0][4] if samples else 0
                steady = [(x[0], x[1]) for x in samples if x[0] <= t0 + write_s and x[4] > first]
                if len(steady) >= 5:
                    mt = statistics.mean(x[0] for x in steady)
                    ml = statistics.mean(x[1] for x in steady)
                    slope = sum((x[0] - mt) * (x[1] - ml) for x in steady) / sum((x[0] - mt) ** 2 for x in steady)
                    f = 1 - slope
                    keeps = f >= KEEP_UP
                    self.row(sec, "… steady state: lag trend after the first cycle (least squares over the samples "
                                  "while fio wrote) → applied / written", f"{f:.2f}×",
                             f"lag {slope:+.3f} s per s over {len(steady)} samples, "
                             f"{steady[0][1]:.1f} s → {steady[-1][1]:.1f} s", f"{ok(keeps)} apply keeps up: "
                                                                                   f"{'yes' if keeps else 'no'}")
                    self.targets.append(f"apply keeps up with {secs} s of sustained {label} (steady state: applied ≥ "
                                        f"{KEEP_UP:.0%} of written, from the lag's trend): {f:.2f}× {ok(keeps)}; "
                                        f"whole window {caught / write_rate:.2f}×")
                else:
                    self.targets.append(f"apply keeps up with {secs} s of sustained {label}: too few samples to tell")
            if samples:
                lags = [x[1] for x in samples if x[2] != "resync-required"] or [0]
                states = sorted({x[2] for x in samples})
                self.row(sec, "… lag (status lag_seconds, sampled from the first write until synced)",
                         f"max {max(lags):.1f} s", f"mean {statistics.mean(lags):.1f} s over {len(lags)} samples; "
                         f"max pending {mib(max(x[5] for x in samples))}; states: {', '.join(states)}", "")

    # 2 -----------------------------------------------------------------
    def hotspot(self):
        sec = "2 wire / guest bytes"
        w = fio_write(self.path("hotspot-true.json"))
        wr = fio_write(self.path("hotspot-false.json"))
        figs = {}
        for comp in ("true", "false"):
            b, a = primary(self.path(f"hotspot-{comp}-before.json")), primary(self.path(f"hotspot-{comp}-after.json"))
            figs[comp] = (delta(b, a, "metrics.cycle_wire_bytes_total"), delta(b, a, "metrics.cycles_shipped_total"))
        if w is None or wr is None or figs["true"][0] is None or figs["false"][0] is None:
            self.missing(sec, "hotspot")
            return
        guest = w["io_bytes"]
        if wr["io_bytes"] != guest:
            self.notes.append(f"hotspot: the two fio runs wrote different amounts ({guest} and {wr['io_bytes']} bytes)")
        uniq = self.unique_bytes("hotspot-true.iolog")
        kv = self.kv("hotspot")
        zstd, raw = figs["true"][0], figs["false"][0]
        freq = self.meta.get("hot_frequency", "?")
        self.row(sec, f"hot spot: {mib(guest)} of 4k random writes, 80% of them on 20% of the blocks "
                      f"(fio zoned:80/20:20/80), 50% compressible; guest bytes written", mib(guest),
                 f"distinct blocks written: {mib(uniq)}" if uniq else "", "")
        self.row(sec, "… without coalescing, no compression (a write-by-write shipper)", mib(guest), "1.00× guest", "")
        self.row(sec, "… without coalescing, zstd (estimate: guest × the zstd ratio below)",
                 mib(guest * zstd / raw), f"{zstd / raw:.2f}× guest", "")
        self.row(sec, f"… with coalescing (cycles every {freq}), no compression", mib(raw),
                 f"{raw / guest:.2f}× guest, in {cycles_of(figs['false'][1])}"
                 + (f"; {raw / uniq:.3f}× the distinct blocks" if uniq else ""), "")
        self.row(sec, f"… with coalescing and zstd (the default)", mib(zstd),
                 f"{zstd / guest:.2f}× guest, in {cycles_of(figs['true'][1])}; "
                 f"replicas identical: {kv.get('hot-zstd.identical', '?')}/{kv.get('hot-raw.identical', '?')}",
                 f"saves {1 - zstd / guest:.0%}")

    def unique_bytes(self, name):
        """Bytes of the distinct 4 KiB blocks a fio write_iolog wrote."""
        seen = set()
        for line in read_lines(self.path(name)):
            # "[time] FILE write OFFSET LENGTH": iolog v3 has the time, v2 not
            f = line.split()
            if "write" not in f[1:3]:
                continue
            i = f.index("write")
            if len(f) < i + 3:
                continue
            off, n = int(f[i + 1]), int(f[i + 2])
            seen.update(range(off // 4096, (off + n + 4095) // 4096))
        return len(seen) * 4096

    # 3 -----------------------------------------------------------------
    def tls(self):
        sec = "3 TLS cost"
        runs = {}
        cipher = ""
        for line in read_lines(self.path("tls.txt")):
            m = re.match(r"Benchmark(Put|AESGCM)/(\w+)-\d+\s+\d+\s+([\d.]+) ns/op\s+([\d.]+) MB/s", line)
            if m:
                key = m.group(2) if m.group(1) == "Put" else "aes_" + m.group(2)
                runs.setdefault(key, []).append(float(m.group(4)) * 1e6 / MiB)
            m = re.search(r"cipher suite (\S+), curve (\S+)", line)
            if m:
                cipher = f"{m.group(1)}, key exchange {m.group(2)}"
        # Replication over TLS vs plain HTTP (BenchmarkReplicate): the goal.
        rep = {}
        for line in read_lines(self.path("tls-replicate.txt")):
            m = re.search(r"(plain|tls):\s+([\d.]+) MiB/s median \(range ([\d.]+)-([\d.]+)\), ([\d.]+) CPU-s/GiB", line)
            if m:
                rep[m.group(1)] = tuple(float(m.group(i)) for i in range(2, 6))
            m = re.search(r"(\d+) rounds of (\d+) MiB", line)
            if m:
                rep["rounds"] = (int(m.group(1)), int(m.group(2)))
            m = re.search(r"by round: median (-?[\d.]+)% \(range (-?[\d.]+)-(-?[\d.]+)\)", line)
            if m:
                rep["paired"] = tuple(float(m.group(i)) for i in range(1, 4))
        rcmd = self.kv("tls").get("replicate_command", "go test -bench Replicate ./bench/tlscost")
        if "plain" in rep and "tls" in rep:
            (pm, plo, phi, pcpu), (tm, tlo, thi, tcpu) = rep["plain"], rep["tls"]
            rounds, size = rep.get("rounds", (0, 0))
            cost = 1 - tm / pm
            self.row(sec, f"replication (shipper → replica staging, commit, apply; {size:,} MiB per round, "
                          f"compression off): plain HTTP", f"{pm:,.0f} MiB/s",
                     f"median of {rounds} rounds (range {plo:,.0f}–{phi:,.0f}); {pcpu:.2f} CPU-s per GiB", "")
            paired = rep.get("paired")
            pnote = f"; paired by round: median {paired[0]:.1f}% (range {paired[1]:.1f}% to {paired[2]:.1f}%)" if paired else ""
            self.row(sec, "… over mutual TLS 1.3", f"{tm:,.0f} MiB/s",
                     f"median (range {tlo:,.0f}–{thi:,.0f}); {tcpu:.2f} CPU-s per GiB; encryption costs {cost:.1%} "
                     f"of the rate{pnote}", f"{ok(cost < 1 - TLS_GOAL)} goal < 10%")
            self.targets.append(f"TLS costs < 10% of plain HTTP replication throughput (`{rcmd}`): "
                                f"{cost:.1%} {ok(cost < 1 - TLS_GOAL)}")
        else:
            self.missing(sec, "tls")
        if "plain" not in runs or "tls" not in runs:
            return
        plain, tls = statistics.median(runs["plain"]), statistics.median(runs["tls"])
        r = tls / plain
        n = len(runs["tls"])
        spread = lambda v: f"{min(v):,.0f}–{max(v):,.0f}"
        self.row(sec, "transport alone, an upper bound: 8 MiB PUTs over loopback, one HTTP/1.1 connection, "
                      "nothing staged: plain HTTP", f"{plain:,.0f} MiB/s",
                 f"median of {n} (range {spread(runs['plain'])})", "")
        self.row(sec, f"… HTTPS, TLS 1.3 mutual auth, ECDSA P-256 ({cipher or 'cipher not logged'})",
                 f"{tls:,.0f} MiB/s", f"median of {n} (range {spread(runs['tls'])}); "
                 f"{r:.2f}× plain, encryption costs {1 - r:.0%} of a memory copy", "")
        med = lambda k: statistics.median(runs[k])
        if "plain_64k" in runs and "tls_64k" in runs:
            self.row(sec, "… both with 64 KiB transport buffers instead of net/http's 4 KiB (16 KiB TLS records)",
                     f"{med('plain_64k'):,.0f} / {med('tls_64k'):,.0f} MiB/s",
                     f"plain / TLS, medians; encryption costs {1 - med('tls_64k') / med('plain_64k'):.0%}", "")
        if "tls_h2" in runs:
            self.row(sec, "… HTTPS with HTTP/2 instead of HTTP/1.1", f"{med('tls_h2'):,.0f} MiB/s",
                     f"median; {med('tls_h2') / tls:.2f}× HTTP/1.1 over TLS", "")
        if "aes_seal" in runs and "aes_open" in runs:
            seal, opn = med("aes_seal"), med("aes_open")
            # CPU time AES-GCM alone takes per 8 MiB chunk on each side,
            # against the time plain HTTP takes for the whole chunk.
            per_chunk = 8 / seal * 1000, 8 / opn * 1000
            self.row(sec, "… AES-128-GCM alone on one core, 16 KiB records (go test -bench AESGCM)",
                     f"{seal:,.0f} / {opn:,.0f} MiB/s",
                     f"seal / open: {per_chunk[0]:.1f} + {per_chunk[1]:.1f} ms of CPU per 8 MiB chunk, "
                     f"plain HTTP moves a chunk in {8 / plain * 1000:.1f} ms", "")

    # 4 -----------------------------------------------------------------
    def resync(self):
        sec = "4 resync"
        kv = self.kv("resync")
        init = primary(self.path("resync-initial.json"))
        before, after = primary(self.path("resync-before.json")), primary(self.path("resync-after.json"))
        if init is None or after is None or "resync_s" not in kv:
            self.missing(sec, "resync")
            return
        size = int(kv["size"])
        m = init["metrics"]
        init_bytes = m["sync_wire_bytes_total"] + m["cycle_wire_bytes_total"]
        init_s = float(kv["initial_s"])
        rs_bytes = delta(before, after, "metrics.sync_wire_bytes_total") + delta(before, after, "metrics.cycle_wire_bytes_total")
        rs_s = float(kv["resync_s"])
        changed = int(kv["changed_blocks"]) * 4096
        pct = self.meta.get("resync_percent", "1")
        self.row(sec, f"initial copy of a {mib(size)} image of random data (compression on)",
                 f"{mib(init_bytes)} in {init_s:.1f} s", f"{rate(size, init_s)}", "")
        self.row(sec, f"… resync after {pct}% of its 4k blocks changed ({mib(changed)}, spread at random; "
                      f"replication paused meanwhile), `replication resync` → `sync` done",
                 f"{mib(rs_bytes)} in {rs_s:.1f} s",
                 f"{rs_bytes / init_bytes:.1%} of the initial copy's bytes, {rs_s / init_s:.0%} of its time; "
                 f"{rs_bytes / changed:.2f}× the changed bytes; replica identical: {kv.get('resync.identical', '?')}",
                 f"{ok(rs_s / init_s <= 0.15)} ≤ 15% of the initial copy's time")
        v = load_json(self.path("resync-verify.json")) if os.path.exists(self.path("resync-verify.json")) else None
        if v is not None:
            self.row(sec, "… `vdrepl verify --rate unlimited` of the same image after it (page cache dropped)",
                     f"{mib(v['checked_bytes'])} in {v['duration_seconds']:.1f} s",
                     f"{rate(v['checked_bytes'], v['duration_seconds'])}; {v['mismatch_blocks']} mismatching blocks",
                     f"{ok(v['mismatch_blocks'] == 0 and kv.get('verify_ok') == '1')} clean")
        if "primary_read_bytes" in kv:
            pr, rr = int(kv["primary_read_bytes"]), int(kv["replica_read_bytes"])
            self.row(sec, "… read from storage during the resync (/proc/PID/io read_bytes, page cache dropped before)",
                     f"primary {mib(pr)}, replica {mib(rr)}",
                     f"{pr / size:.1%} and {rr / size:.1%} of the disk",
                     f"{ok(max(pr, rr) <= 0.10 * size)} ≤ 10% of the disk on each side")

    # 5 -----------------------------------------------------------------
    def lag(self):
        sec = "5 lag"
        kv = self.kv("lag")
        samples = []
        for line in read_lines(self.path("lag-samples.txt")):
            f = line.split()
            if len(f) >= 6:
                samples.append((float(f[0]), float(f[1]), f[2], f[3], int(f[4]), int(f[5])))
        after = primary(self.path("lag-after.json"))
        before = primary(self.path("lag-before.json"))
        w = fio_write(self.path("lag-load.json"))
        if not samples or w is None or after is None:
            self.missing(sec, "lag")
            return
        freq = seconds(kv.get("frequency"))
        lags = [s[1] for s in samples]
        worst = max(lags)
        goal = 2 * freq if freq else None
        health = sorted({s[3] for s in samples})
        states = sorted({s[2] for s in samples})
        missed = delta(before, after, "metrics.cycles_missed_total")
        shipped = delta(before, after, "metrics.cycles_shipped_total")
        am = after["metrics"]
        self.row(sec, f"{kv.get('seconds')} s of 64k random writes at {w['bw_bytes'] / MiB:,.1f} MiB/s "
                      f"(fio --rate={kv.get('rate')}), 50% compressible, cycles every {kv.get('frequency')}: "
                      f"max lag_seconds", f"{worst:.1f} s",
                 f"target < {goal:.0f} s (2 cycles); mean {statistics.mean(lags):.1f} s over {len(lags)} samples",
                 f"{ok(goal is not None and worst < goal)}")
        self.row(sec, "… shipping", f"{cycles_of(shipped)}, {missed} missed",
                 f"avg latency {am['avg_latency_seconds']:.1f} s (max {am['max_latency_seconds']:.1f} s); "
                 f"max pending {mib(max(s[5] for s in samples))}; health seen: {', '.join(health)}; "
                 f"states: {', '.join(states)}; replica identical: {kv.get('lag.identical', '?')}", "")
        self.targets.append(f"lag under steady load stays under 2 cycles ({goal:.0f} s): max {worst:.1f} s {ok(worst < goal)}")

    def render(self):
        m = self.meta
        modes = self.meta.get("apply_modes", "burst").split()
        for part in ("apply", "hotspot", "tls", "resync", "lag"):
            if part == "apply" and self.ran(part):
                if "burst" in modes:
                    self.apply()
                if "sustained" in modes:
                    self.sustained()
            elif self.ran(part):
                getattr(self, part)()
            for n in read_lines(self.path(part + ".notes")) + (read_lines(self.path("sustain.notes")) if part == "apply" else []):
                self.notes.append(f"{part}: {n}")
        out = []
        p = out.append
        p(f"# vdrepl replication benchmark — {m.get('date', '?')}")
        p("")
        p(f"- Machine: {m.get('cpu', '?')}, {m.get('ram', '?')} RAM, {m.get('kernel', '?')}, {m.get('os', '?')}")
        p(f"- Disk: {m.get('disk', '?')} (images, journals, spools and the replica's storage all on it)")
        steps = ", ".join(read_lines(self.path("load")))
        p(f"- Load average (1/5/15 min) at start: {m.get('load_start', '?')}; at end: {m.get('load_end', '?')}"
          + (f"; 1 min after each part: {steps}" if steps else ""))
        p(f"- Command: `{m.get('command', 'bench/repl.sh')}`")
        p(f"- vdrepl {m.get('vdrepl', '?')}; {m.get('fio', 'fio')} (nbd engine over the primary's unix socket); {m.get('go', 'go')}")
        extra = f" {m['serve_args']}" if m.get("serve_args") else ""
        p(f"- Two daemons on loopback: primary (`serve --journal-cap {m.get('journal_cap', '?')}{extra}`) and replica "
          f"(`serve --replica-listen 127.0.0.1:0{extra}`), mutual TLS 1.3 with certificates from `vdrepl pki`; "
          f"one VM with one disk per measurement")
        p("")
        p("| # | Measurement | Result | Compared with | Verdict |")
        p("|---|---|---:|---|---|")
        for r in self.rows:
            p("| " + " | ".join(str(c) for c in r) + " |")
        p("")
        if self.targets:
            p("Targets:")
            for t in self.targets:
                p(f"- {t}")
            p("")
        rss = []
        for who in ("primary", "replica"):
            kb = read_lines(self.path(f"rss-{who}-kb"))
            if kb:
                rss.append(f"{who} {int(kb[0]) / 1024:.0f} MiB")
        steps = []
        for part in ("apply", "hotspot", "tls", "resync", "lag"):
            kb = read_lines(self.path(f"rss-primary-{part}-kb"))
            if kb:
                steps.append(f"{part} {int(kb[0]) / 1024:.0f}")
        if rss:
            p(f"Daemon peak RSS (VmHWM) over the whole run: {', '.join(rss)}"
              + (f" (the primary's peak after each part, MiB: {', '.join(steps)})" if steps else "") + ".")
            p("")
        p("MiB = 2^20 bytes. Wire bytes are the primary's `cycle_wire_bytes_total` and `sync_wire_bytes_total` "
          "(whole streams: headers, frames, payload), differences taken around each measurement.")
        notes = self.notes + read_lines(self.path("notes"))
        if notes:
            p("")
            p("Notes:")
            for n in dict.fromkeys(notes):
                p(f"- {n}")
        return "\n".join(out)


def main(argv):
    if len(argv) >= 3 and argv[1] == "--get":
        st = primary(argv[2])
        if st is None:
            return 1
        print(" ".join(str(status_field(st, k)) for k in argv[3:]))
        return 0
    if len(argv) >= 3 and argv[1] == "--fio":
        w = fio_write(argv[2])
        if w is None:
            return 1
        print(" ".join(str(w.get(k)) for k in argv[3:]))
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(Report(argv[1]).render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
