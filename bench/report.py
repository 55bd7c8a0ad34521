#!/usr/bin/env python3
"""Turn a bench/fio.sh run directory into one Markdown report.

    report.py RUNDIR          print the report (header, table, targets, notes)
    report.py --check FILE    exit 1 unless FILE is a fio JSON result without errors

RUNDIR holds `meta` (key=value lines) and one directory per round,
`round-1`, `round-2`, ... (each with an optional `started` line), holding one
directory per target with one fio JSON file per job, plus optional `notes`,
`failed` and `rss-kb` files. A run directory from before rounds existed (the
target directories directly in RUNDIR) reads as one round.

Each cell is the median over the rounds in which it succeeded; each ratio is
the median of the per-round ratios (rounds where both sides succeeded), and
the verdicts use that median. Peak RSS is the maximum over all rounds.
"""
import json
import os
import re
import statistics
import sys

TARGETS = [  # (dir, column title)
    ("raw", "raw file"),
    ("qemu-nbd", "qemu-nbd"),
    ("nbdkit", "nbdkit-file"),
    ("vdrepl-nbd", "vdrepl-nbd"),
    ("vdrepl-notree", "vdrepl-nbd without block trees"),
    ("nbdfuse", "nbdfuse (qemu-nbd)"),
    ("vdrepl-fuse", "vdrepl-fuse"),
    ("vdrepl-tcp", "vdrepl nbd:// (TCP)"),
    ("vdrepl-nbds", "vdrepl nbds:// (TLS)"),
]

# (job, label template, fio direction, unit)
JOBS = [
    ("randwrite-4k-qd1", "4k randwrite QD1", "write", "IOPS"),
    ("randwrite-4k-qd16", "4k randwrite QD16", "write", "IOPS"),
    ("write-1m-seq", "1M seq write QD{seq_qd}", "write", "MiB/s"),
    ("randwrite-4k-fsync32", "4k randwrite QD{fsync_qd}, fsync every 32", "write", "IOPS"),
    ("randread-4k-qd16", "4k randread QD16", "read", "IOPS"),
]

# (numerator, denominator, column title)
RATIOS = [
    ("vdrepl-nbd", "qemu-nbd", "vdrepl-nbd / qemu-nbd"),
    ("vdrepl-nbd", "nbdkit", "vdrepl-nbd / nbdkit"),
    ("vdrepl-fuse", "nbdfuse", "vdrepl-fuse / nbdfuse"),
    ("vdrepl-nbds", "vdrepl-tcp", "TLS: nbds:// / nbd://"),
    ("vdrepl-nbd", "vdrepl-notree", "block trees: with / without"),
]

# The targets: (numerator, denominator, job, minimum ratio)
GOALS = [
    ("vdrepl-nbd", "qemu-nbd", "randwrite-4k-qd16", 1.0),
    ("vdrepl-nbd", "qemu-nbd", "write-1m-seq", 0.8),
    ("vdrepl-fuse", "nbdfuse", "randwrite-4k-qd16", 1.5),
    ("vdrepl-fuse", "nbdfuse", "write-1m-seq", 1.0),
    # TLS costs less than 15% (issue 14).
    ("vdrepl-nbds", "vdrepl-tcp", "randwrite-4k-qd16", 0.85),
    ("vdrepl-nbds", "vdrepl-tcp", "write-1m-seq", 0.85),
    # The block trees' checksums cost at most 5% (issue 12).
    ("vdrepl-nbd", "vdrepl-notree", "randwrite-4k-qd16", 0.95),
    ("vdrepl-nbd", "vdrepl-notree", "write-1m-seq", 0.95),
]
RSS_LIMIT_MIB = 300


def load_fio(path):
    """fio's JSON output, tolerating log lines fio prints before it."""
    with open(path) as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON")
    return json.loads(text[start:])


def check(path):
    try:
        job = load_fio(path)["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        print(f"bad fio output: {e}", file=sys.stderr)
        return 1
    if job.get("error"):
        print(f"fio job error {job['error']}", file=sys.stderr)
        return 1
    if job["read"]["total_ios"] + job["write"]["total_ios"] == 0:
        print("fio job did no I/O", file=sys.stderr)
        return 1
    return 0


def read_lines(path):
    try:
        with open(path) as f:
            return [l.strip() for l in f if l.strip()]
    except OSError:
        return []


def read_meta(run):
    meta = {}
    for line in read_lines(os.path.join(run, "meta")):
        k, _, v = line.partition("=")
        meta[k] = v
    return meta


class Result:
    def __init__(self, value=None, error=False, buffered=False, writes_per_flush=None):
        self.value, self.error, self.buffered = value, error, buffered
        self.writes_per_flush = writes_per_flush


def result(rdir, target, job, ddir, unit):
    d = os.path.join(rdir, target)
    path = os.path.join(d, job + ".json")
    if not os.path.exists(path):
        return None
    buffered = "direct=0" in read_lines(os.path.join(d, "notes"))
    if job in read_lines(os.path.join(d, "failed")):
        return Result(error=True)
    try:
        j = load_fio(path)["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return Result(error=True)
    s = j[ddir]
    value = s["iops"] if unit == "IOPS" else s["bw_bytes"] / 1048576
    wpf = None
    if j.get("sync", {}).get("total_ios"):
        wpf = j["write"]["total_ios"] / j["sync"]["total_ios"]
    return Result(value, buffered=buffered, writes_per_flush=wpf)


def rounds_of(run):
    """[(round number, directory)], oldest first; an old run is one round."""
    found = []
    for name in os.listdir(run):
        m = re.fullmatch(r"round-([0-9]+)", name)
        if m and os.path.isdir(os.path.join(run, name)):
            found.append((int(m.group(1)), os.path.join(run, name)))
    return sorted(found) or [(1, run)]


class Cell:
    """One (target, job) over the rounds: the median of the rounds that
    succeeded, how many did, and how many ran at all."""

    def __init__(self, results):
        ran = [r for r in results if r is not None]
        ok = [r for r in ran if not r.error]
        self.ran, self.ok = len(ran), len(ok)
        self.value = statistics.median(r.value for r in ok) if ok else None
        self.buffered = any(r.buffered for r in ok)
        wpf = [r.writes_per_flush for r in ok if r.writes_per_flush]
        self.writes_per_flush = statistics.median(wpf) if wpf else None


def fmt_number(v):
    return f"{v:,.0f}"


def fmt_cell(c, nrounds):
    if c.ran == 0:
        return "—"
    if c.ok == 0:
        return "ERR"
    v = fmt_number(c.value)
    if c.buffered:
        v += " †"
    if c.ok < nrounds:
        v += f" ({c.ok}/{nrounds})"
    return v


def ratio(a, b):
    """a / b for two single-round Results, None unless both succeeded."""
    if a is None or b is None or a.error or b.error or not b.value:
        return None
    return a.value / b.value


def round_ratios(per_round, n, d, job):
    """n / d on job in every round where both succeeded."""
    rs = [ratio(res[n, job], res[d, job]) for res in per_round]
    return [r for r in rs if r is not None]


def median_ratio(per_round, n, d, job):
    """(median of the per-round ratios or None, how many rounds had one)."""
    rs = round_ratios(per_round, n, d, job)
    return (statistics.median(rs), len(rs)) if rs else (None, 0)


def fmt_ratio(r, minimum=None):
    """r as 0.00x; three decimals when two would round it onto a line it
    misses (0.798 against 0.8 would read "0.80x ❌")."""
    if r is None:
        return "—"
    s = f"{r:.2f}"
    if minimum is not None and r < minimum <= float(s):
        s = f"{r:.3f}"
    return s + "x"


def fmt_min(m):
    """A goal's minimum: 1.0, 0.8, 0.85."""
    return f"{m:.1f}" if round(m, 1) == m else f"{m:.2f}"


def verdict(r, minimum):
    return "✅" if r >= minimum else "❌"


def main(run):
    meta = read_meta(run)
    rounds = rounds_of(run)
    nrounds = len(rounds)
    per_round = []  # one {(target, job): Result} per round
    for _, rdir in rounds:
        per_round.append({(t, job): result(rdir, t, job, ddir, unit)
                          for t, _ in TARGETS for job, _, ddir, unit in JOBS})
    cells = {(t, job): Cell([res[t, job] for res in per_round])
             for t, _ in TARGETS for job, _, _, _ in JOBS}
    goal = {(n, d, j): m for n, d, j, m in GOALS}

    def job_label(job):
        label = next(l for j, l, _, _ in JOBS if j == job)
        return label.format(seq_qd=meta.get("seq_qd", "?"), fsync_qd=meta.get("fsync_qd", "?"))

    out = []
    p = out.append
    p(f"# vdrepl fio benchmark — {meta.get('date', '?')}")
    p("")
    p(f"- Machine: {meta.get('cpu', '?')}, {meta.get('ram', '?')} RAM, {meta.get('kernel', '?')}, {meta.get('os', '?')}")
    p(f"- Disk: {meta.get('disk', '?')}")
    if meta.get("load_start"):
        p(f"- Load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta.get('load_end', '?')}")
    p(f"- Command: `{meta.get('command', 'bench/fio.sh')}`")
    p(f"- Image: {meta.get('size', '?')} raw, a fresh fully written copy per target, page cache dropped before each target; "
      f"{meta.get('runtime', '?')} s per job after {meta.get('ramp', '?')} s ramp; numjobs=1; "
      f"NBD over {meta.get('transport', 'unix')} sockets")
    p(f"- Exports: fio nbd engine (libnbd). Files: libaio, direct=1. "
      f"{meta.get('fio', 'fio')}, {meta.get('qemu_nbd', '')}, {meta.get('nbdkit', '')}, {meta.get('nbdfuse', '')}; "
      f"vdrepl {meta.get('vdrepl', '?')}"
      + (f" (serve {meta['vdrepl_args']})" if meta.get("vdrepl_args") else ""))
    if nrounds == 1:
        p("- Rounds: 1 (one sample per cell; `BENCH_ROUNDS=3` gives medians of three)")
    else:
        p(f"- Rounds: {nrounds}, interleaved (every target in the order of the columns, then again); "
          f"each cell is the median over the rounds in which it succeeded"
          + (" (for an even count, the mean of the middle two)" if nrounds % 2 == 0 else "")
          + "; each ratio is the median of the per-round ratios")
    p("")

    head = ["Job"] + [title for _, title in TARGETS] + [title for _, _, title in RATIOS]
    p("| " + " | ".join(head) + " |")
    p("|" + "---|" + "---:|" * (len(head) - 1))
    for job, _, _, unit in JOBS:
        row = [f"{job_label(job)} ({unit})"]
        row += [fmt_cell(cells[t, job], nrounds) for t, _ in TARGETS]
        for n, d, _ in RATIOS:
            r, k = median_ratio(per_round, n, d, job)
            m = goal.get((n, d, job))
            cell = fmt_ratio(r, m)
            if m is not None and r is not None:
                cell += f" {verdict(r, m)} ≥{fmt_min(m)}"
            if r is not None and k < nrounds:
                cell += f" ({k}/{nrounds})"
            row.append(cell)
        p("| " + " | ".join(row) + " |")
    p("")

    # Memory: the highest VmHWM any round saw, per target.
    rss = {}
    for t in ("vdrepl-nbd", "vdrepl-notree", "vdrepl-fuse", "vdrepl-tcp", "vdrepl-nbds"):
        for _, rdir in rounds:
            kb = read_lines(os.path.join(rdir, t, "rss-kb"))
            if kb:
                rss[t] = max(rss.get(t, 0), int(kb[0]) / 1024)
    over = f" (highest of {nrounds} rounds)" if nrounds > 1 else ""
    if rss:
        peak = max(rss.values())
        parts = ", ".join(f"{v:.0f} MiB during {t}" for t, v in rss.items())
        p(f"vdrepl daemon peak RSS (VmHWM){over}: {parts} — "
          f"{'✅' if peak < RSS_LIMIT_MIB else '❌'} target < {RSS_LIMIT_MIB} MiB")
    else:
        p("vdrepl daemon peak RSS: not measured (vdrepl did not run)")
    p("")

    # Targets from the issue, as a checklist.
    p("Targets" + (" (median ratio over the rounds):" if nrounds > 1 else ":"))
    for n, d, job, m in GOALS:
        r, k = median_ratio(per_round, n, d, job)
        status = "not measured" if r is None else f"{fmt_ratio(r, m)} {verdict(r, m)}"
        if r is not None and nrounds > 1:
            met = sum(1 for x in round_ratios(per_round, n, d, job) if x >= m)
            status += f" (met in {met} of {k} rounds)"
        p(f"- {n} ≥ {fmt_min(m)}x {d} on {job_label(job)}: {status}")
    if rss:
        p(f"- vdrepl daemon RSS < {RSS_LIMIT_MIB} MiB under load: {max(rss.values()):.0f} MiB "
          f"{'✅' if max(rss.values()) < RSS_LIMIT_MIB else '❌'}")
    p("")

    if nrounds > 1:
        per_round_table(p, meta, rounds, per_round, job_label)

    # Flushes fio actually sent in the fsync job (see README: fio 3.33's nbd
    # engine sends about QD flushes per 32 writes when iodepth > 1).
    wpf = [(title, cells[t, "randwrite-4k-fsync32"].writes_per_flush) for t, title in TARGETS]
    wpf = [(title, v) for title, v in wpf if v]
    if wpf:
        p("Writes per fsync/flush actually issued in the fsync job"
          + (" (median over the rounds)" if nrounds > 1 else "") + ": "
          + ", ".join(f"{title} {v:.1f}" for title, v in wpf) + ".")
        p("")

    notes = []
    if meta.get("vdrepl_note"):
        notes.append(meta["vdrepl_note"])
    for num, rdir in rounds:
        where = f"round-{num}/" if rdir != run else ""
        prefix = f"round {num}, " if nrounds > 1 else ""
        for t, title in TARGETS:
            for n in read_lines(os.path.join(rdir, t, "notes")):
                if n == "direct=0":
                    n = "O_DIRECT refused: the file jobs ran buffered (direct=0), marked †"
                notes.append(f"{prefix}{title}: {n}")
            for j in read_lines(os.path.join(rdir, t, "failed")):
                notes.append(f"{prefix}{title}: job {j} failed (ERR); see {where}{t}/{j}.log in the run directory")
    p("Units: IOPS, or MiB/s for the 1M job; higher is better. Ratios above 1.0x mean vdrepl is faster. "
      "— = not run."
      + (" Ratios are the median of the per-round ratios, not the ratio of the medians." if nrounds > 1 else "")
      + (f" (k/{nrounds}) = the median of the k rounds that succeeded; the others failed (see the notes)."
         if any(0 < c.ok < nrounds for c in cells.values()) else ""))
    if notes:
        p("")
        p("Notes:")
        for n in dict.fromkeys(notes):
            p(f"- {n}")
    print("\n".join(out))


# The jobs that have targets, with the columns the targets compare.
ROUND_COLUMNS = ["vdrepl-nbd", "vdrepl-notree", "qemu-nbd", "nbdkit", "vdrepl-fuse", "nbdfuse", "vdrepl-tcp", "vdrepl-nbds"]


def per_round_table(p, meta, rounds, per_round, job_label):
    """Every round's values for the jobs with targets, so the spread shows."""
    title = dict(TARGETS)
    jobs = list(dict.fromkeys(j for _, _, j, _ in GOALS))
    goals = {}  # (n, d) -> {job: minimum}
    for n, d, j, m in GOALS:
        goals.setdefault((n, d), {})[j] = m
    head = ["Job", "Round"] + [title[t] for t in ROUND_COLUMNS] + [f"{n} / {d}" for n, d in goals]
    p("Per round (the spread behind the medians):")
    p("")
    p("| " + " | ".join(head) + " |")
    p("|---|---|" + "---:|" * (len(head) - 2))
    for job in jobs:
        unit = next(u for j, _, _, u in JOBS if j == job)
        for (num, rdir), res in zip(rounds, per_round):
            started = dict(f.partition("=")[::2] for f in " ".join(read_lines(os.path.join(rdir, "started"))).split())
            when = f" ({started['start']}, load {started.get('load', '?')})" if started.get("start") else ""
            row = [f"{job_label(job)} ({unit})", f"{num}{when}"]
            for t in ROUND_COLUMNS:
                r = res[t, job]
                row.append("—" if r is None else "ERR" if r.error else fmt_number(r.value))
            for (n, d), ms in goals.items():
                r, m = ratio(res[n, job], res[d, job]), ms.get(job)
                cell = fmt_ratio(r, m)
                if r is not None and m is not None:
                    cell += f" {verdict(r, m)}"
                row.append(cell)
            p("| " + " | ".join(row) + " |")
    p("")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(check(sys.argv[2]))
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
