#!/usr/bin/env python3
"""Turn a bench/fio.sh run directory into one Markdown report.

    report.py RUNDIR          print the report (header, table, targets, notes)
    report.py --check FILE    exit 1 unless FILE is a fio JSON result without errors

RUNDIR holds `meta` (key=value lines) and one directory per target with one
fio JSON file per job, plus optional `notes`, `failed` and `rss-kb` files.
"""
import json
import os
import sys

TARGETS = [  # (dir, column title)
    ("raw", "raw file"),
    ("qemu-nbd", "qemu-nbd"),
    ("nbdkit", "nbdkit-file"),
    ("vdrepl-nbd", "vdrepl-nbd"),
    ("nbdfuse", "nbdfuse (qemu-nbd)"),
    ("vdrepl-fuse", "vdrepl-fuse"),
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
]

# The targets: (numerator, denominator, job, minimum ratio)
GOALS = [
    ("vdrepl-nbd", "qemu-nbd", "randwrite-4k-qd16", 1.0),
    ("vdrepl-nbd", "qemu-nbd", "write-1m-seq", 0.8),
    ("vdrepl-fuse", "nbdfuse", "randwrite-4k-qd16", 1.5),
    ("vdrepl-fuse", "nbdfuse", "write-1m-seq", 1.0),
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


def result(run, target, job, ddir, unit):
    d = os.path.join(run, target)
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


def fmt_value(r):
    if r is None:
        return "—"
    if r.error:
        return "ERR"
    v = f"{r.value:,.0f}"
    return v + " †" if r.buffered else v


def ratio(a, b):
    if a is None or b is None or a.error or b.error or not b.value:
        return None
    return a.value / b.value


def main(run):
    meta = read_meta(run)
    res = {}
    for t, _ in TARGETS:
        for job, _, ddir, unit in JOBS:
            res[t, job] = result(run, t, job, ddir, unit)
    goal = {(n, d, j): m for n, d, j, m in GOALS}

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
    p("")

    head = ["Job"] + [title for _, title in TARGETS] + [title for _, _, title in RATIOS]
    p("| " + " | ".join(head) + " |")
    p("|" + "---|" + "---:|" * (len(head) - 1))
    for job, label, _, unit in JOBS:
        label = label.format(seq_qd=meta.get("seq_qd", "?"), fsync_qd=meta.get("fsync_qd", "?"))
        row = [f"{label} ({unit})"]
        row += [fmt_value(res[t, job]) for t, _ in TARGETS]
        for n, d, _ in RATIOS:
            r = ratio(res[n, job], res[d, job])
            cell = "—" if r is None else f"{r:.2f}x"
            m = goal.get((n, d, job))
            if m is not None and r is not None:
                cell += f" {'✅' if r >= m else '❌'} ≥{m:.1f}"
            row.append(cell)
        p("| " + " | ".join(row) + " |")
    p("")

    # Memory.
    rss = {}
    for t in ("vdrepl-nbd", "vdrepl-fuse"):
        kb = read_lines(os.path.join(run, t, "rss-kb"))
        if kb:
            rss[t] = int(kb[0]) / 1024
    if rss:
        peak = max(rss.values())
        parts = ", ".join(f"{v:.0f} MiB during {t}" for t, v in rss.items())
        p(f"vdrepl daemon peak RSS (VmHWM): {parts} — "
          f"{'✅' if peak < RSS_LIMIT_MIB else '❌'} target < {RSS_LIMIT_MIB} MiB")
    else:
        p("vdrepl daemon peak RSS: not measured (vdrepl did not run)")
    p("")

    # Targets from the issue, as a checklist.
    p("Targets:")
    for n, d, job, m in GOALS:
        r = ratio(res[n, job], res[d, job])
        label = next(l for j, l, _, _ in JOBS if j == job).format(
            seq_qd=meta.get("seq_qd", "?"), fsync_qd=meta.get("fsync_qd", "?"))
        status = "not measured" if r is None else f"{r:.2f}x {'✅' if r >= m else '❌'}"
        p(f"- {n} ≥ {m:.1f}x {d} on {label}: {status}")
    if rss:
        p(f"- vdrepl daemon RSS < {RSS_LIMIT_MIB} MiB under load: {max(rss.values()):.0f} MiB "
          f"{'✅' if max(rss.values()) < RSS_LIMIT_MIB else '❌'}")
    p("")

    # Flushes fio actually sent in the fsync job (see README: fio 3.33's nbd
    # engine sends about QD flushes per 32 writes when iodepth > 1).
    wpf = [(title, res[t, "randwrite-4k-fsync32"]) for t, title in TARGETS]
    wpf = [(title, r.writes_per_flush) for title, r in wpf if r is not None and r.writes_per_flush]
    if wpf:
        p("Writes per fsync/flush actually issued in the fsync job: "
          + ", ".join(f"{title} {v:.1f}" for title, v in wpf) + ".")
        p("")

    notes = []
    if meta.get("vdrepl_note"):
        notes.append(meta["vdrepl_note"])
    for t, title in TARGETS:
        for n in read_lines(os.path.join(run, t, "notes")):
            if n == "direct=0":
                n = "O_DIRECT refused: the file jobs ran buffered (direct=0), marked †"
            notes.append(f"{title}: {n}")
        for j in read_lines(os.path.join(run, t, "failed")):
            notes.append(f"{title}: job {j} failed (ERR); see {t}/{j}.log in the run directory")
    p("Units: IOPS, or MiB/s for the 1M job; higher is better. Ratios above 1.0x mean vdrepl is faster. "
      "— = not run.")
    if notes:
        p("")
        p("Notes:")
        for n in dict.fromkeys(notes):
            p(f"- {n}")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(check(sys.argv[2]))
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
