#!/usr/bin/env python3
"""Optiprism benchmark: ingestion throughput, and trends queries against DuckDB and chDB.

Usage (from the repository root):

    cargo build --release --bin prism --bin prismctl
    python3 bench/run.py --events 1000000 --events 10000000
    python3 bench/run.py --queries-only --sizes 1000000            # queries only, one size
    python3 bench/run.py --queries-only --sizes 1000000 --only funnel
    python3 bench/run.py --report-only                            # rewrite docs/benchmarks.md

The binaries are read from $CARGO_TARGET_DIR/release (default ~/.cache/optiprism/target-release).
$PRISM_LOG sets the nodes' `--log` filter (default `warn`), e.g.
`warn,optiprism_consensus::wal=debug` to time the Raft log's segment rotations.

For each size it generates the same events (prismctl gen, fixed seed) as an Arrow file for the
peers and as Segment batches for Optiprism; measures HTTP ingestion with batches of 1,000 (and of
100 on up to 1M events) with durability on; loads the file into DuckDB (native table) and chDB
(MergeTree ordered by event and time, plus a copy ordered by distinct id and time for the
per-person classes); runs each query class (trends, breakdown top-N, funnel, retention, paths,
cohort filter) on all of them in the same run, checks that the answers agree, and writes
bench/results.json and docs/benchmarks.md.
"""

import argparse, json, math, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/optiprism/target-release"))
WRITE_KEY = "wk_benchmark_key"
TOKEN = "pat_benchmark_token"
VENV = Path(os.environ.get("OPTIPRISM_BENCH_VENV", Path.home() / ".cache/optiprism/bench-venv"))


def ensure_venv():
    """Re-executes this script inside a venv that has the peers installed."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not (VENV / "bin/python").exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    subprocess.check_call([str(VENV / "bin/pip"), "install", "-q", "-r", str(ROOT / "bench/requirements.txt")])
    os.execv(str(VENV / "bin/python"), [str(VENV / "bin/python"), __file__] + sys.argv[1:])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name):
    path = TARGET / "release" / name
    if not path.exists():
        sys.exit(f"{path} is missing: build it with `cargo build --release --bin {name}` (CARGO_TARGET_DIR={TARGET})")
    return str(path)


class Node:
    def __init__(self, data_dir):
        self.http_port, self.flight_port = free_port(), free_port()
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.flight = f"127.0.0.1:{self.flight_port}"
        self.log = open(Path(data_dir).parent / "prism.log", "ab")
        self.proc = subprocess.Popen(
            [binary("prism"), "up", "--data-dir", str(data_dir), "--http", f"127.0.0.1:{self.http_port}",
             "--flight", self.flight, "--write-key", WRITE_KEY, "--api-token", TOKEN, "--log", os.environ.get("PRISM_LOG", "warn")],
            stdout=self.log, stderr=self.log)
        import urllib.request
        for _ in range(600):
            try:
                if urllib.request.urlopen(self.http + "/readyz", timeout=1).status == 200:
                    return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("prism did not become ready")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


class Cluster:
    """Three `prism node` members on 127.0.0.1-3 replicating every partition (factor 3), as the
    repository's cluster.toml describes, on free ports; `partitions` 8 (the one node's count)
    unless given, where cluster.toml has 16."""

    def __init__(self, workdir, partitions=8, extra=""):
        self.dir = Path(workdir) / "cluster"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        members, self.http = [], []
        for i in (1, 2, 3):
            ip = f"127.0.0.{i}"
            ports = [free_port_on(ip) for _ in range(3)]
            members.append(f"[[cluster.initial-members]]\nid = {i}\nraft = \"{ip}:{ports[0]}\"\n"
                           f"http = \"{ip}:{ports[1]}\"\nflight = \"{ip}:{ports[2]}\"\n")
            self.http.append(f"http://{ip}:{ports[1]}")
        config = self.dir / "cluster.toml"
        config.write_text(f"[node]\ndata-dir = \"{self.dir}/node-{{id}}\"\n{extra}\n[cluster]\npartitions = {partitions}\n"
                          f"replication-factor = 3\nca-dir = \"{self.dir}/ca\"\n" + "\n".join(members))
        self.log = open(self.dir / "prism.log", "ab")
        self.procs = [subprocess.Popen(
            [binary("prism"), "node", "--config", str(config), "--id", str(i), "--write-key", WRITE_KEY,
             "--api-token", TOKEN, "--log", os.environ.get("PRISM_LOG", "warn")], stdout=self.log, stderr=self.log) for i in (1, 2, 3)]
        import urllib.request
        for url in self.http:
            for _ in range(1200):
                try:
                    if urllib.request.urlopen(url + "/readyz", timeout=1).status == 200:
                        break
                except Exception:
                    time.sleep(0.1)
            else:
                raise RuntimeError(f"cluster member {url} did not become ready")

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(timeout=120)


def free_port_on(ip):
    """A port free on `ip` for both TCP and UDP (QUIC)."""
    while True:
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((ip, port))
            return port
        except OSError:
            continue


def disk_sync_probe(directory, seconds=20, block=64 * 1024):
    """The data disk's own flush latency, with nothing else running: one writer appending `block`
    bytes and calling fdatasync in a loop for `seconds`, as the Raft log does. Every member's
    acknowledgement waits on such flushes, and the three members share this one disk, so a
    stall of the device stalls every quorum at once."""
    path = Path(directory) / "disk-sync-probe"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
    data, times = b"x" * block, []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(fd, data)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1e3)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    at = lambda q: times[min(len(times) - 1, int(len(times) * q))]
    return {"seconds": seconds, "block_bytes": block, "syncs": len(times), "ms_p50": at(0.5),
            "ms_p99": at(0.99), "ms_p999": at(0.999), "ms_max": times[-1]}


def bench_cluster(events, seed, workdir, rounds=3):
    """Ingestion into a three-member cluster through member 2 (leaders are spread over the members,
    so about two thirds of each batch is forwarded) against one node, in the same run: `rounds`
    alternating rounds of one node then the cluster at full speed (fresh data directories each
    time), then `rounds` runs of the cluster paced at half its median full speed for
    acknowledgement latency, one four times as long at the same pace, and the same pace in
    requests of 100 (an SDK's size), to member 2 and spread over the members; first, the data
    disk's own flush latency (`disk_sync_probe`). Single runs on this
    shared machine move by 10-20%, so the report gives every round and the medians."""
    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]
    Path(workdir).mkdir(parents=True, exist_ok=True)
    disk = disk_sync_probe(workdir)
    print(f"[cluster] the data disk alone: fdatasync of 64 KiB p50 {disk['ms_p50']:.2f} ms, p99 {disk['ms_p99']:.2f} ms,"
          f" p99.9 {disk['ms_p999']:.2f} ms, max {disk['ms_max']:.1f} ms", flush=True)
    single_runs, full_runs = [], []
    for r in range(rounds):
        data = Path(workdir) / f"single-{r}" / "data"
        shutil.rmtree(data.parent, ignore_errors=True)
        data.parent.mkdir(parents=True)
        node = Node(data)
        try:
            single_runs.append(ingest([node.http], events, seed, 1000, 16))
        finally:
            node.stop()
            shutil.rmtree(data.parent, ignore_errors=True)
        full_runs.append(ingest_into_cluster(Cluster(workdir), events, seed))
        s, c = single_runs[-1]["events_per_second"], full_runs[-1]["events_per_second"]
        print(f"[cluster] round {r + 1}/{rounds}: one node {s:,.0f} events/s, three members {c:,.0f} ({c / s:.0%})",
              flush=True)
    half = median([f["events_per_second"] for f in full_runs]) / 2
    paced_runs = []
    for r in range(rounds):
        paced_runs.append(ingest_into_cluster(Cluster(workdir), min(events, 1_000_000), seed + 1 + r, rate=half))
        print(f"[cluster] paced at {half:,.0f} events/s: p50 {paced_runs[-1]['latency_ms_p50']:.1f} ms,"
              f" p99 {paced_runs[-1]['latency_ms_p99']:.1f} ms", flush=True)
    # The short runs start on empty members; this one goes on four times as long, through seals
    # and log segment rotations, with the members' state growing all along.
    sustained = ingest_into_cluster(Cluster(workdir), SUSTAINED_EVENTS, seed + 1 + rounds, rate=half)
    print(f"[cluster] paced at {half:,.0f} events/s for {SUSTAINED_EVENTS:,} events: p50 "
          f"{sustained['latency_ms_p50']:.1f} ms, p99 {sustained['latency_ms_p99']:.1f} ms", flush=True)
    # SDKs send small requests (analytics-python uploads at most 100 events, posthog-python
    # flushes at 100): the same pace in requests of 100 from 64 clients (16 cannot keep the pace
    # at these latencies), sent to member 2 and spread over all three as a load balancer would.
    small = ingest_into_cluster(Cluster(workdir), min(events, 1_000_000), seed + 2 + rounds, rate=half,
                                batch=100, concurrency=64)
    small_spread = ingest_into_cluster(Cluster(workdir), min(events, 1_000_000), seed + 3 + rounds, rate=half,
                                       batch=100, concurrency=64, spread=True)
    for name, r in (("to member 2", small), ("spread over the members", small_spread)):
        print(f"[cluster] requests of 100 {name} at {half:,.0f} events/s: p50 {r['latency_ms_p50']:.1f} ms,"
              f" p99 {r['latency_ms_p99']:.1f} ms", flush=True)
    by_rate = sorted(zip(full_runs, single_runs), key=lambda fs: fs[0]["events_per_second"] / fs[1]["events_per_second"])
    full, single = by_rate[len(by_rate) // 2]
    return {"members": 3, "replication_factor": 3, "full": full, "single": single,
            "rounds": [{"single": s, "full": f} for s, f in zip(single_runs, full_runs)],
            "half_load": sorted(paced_runs, key=lambda p: p["latency_ms_p99"])[len(paced_runs) // 2],
            "half_load_runs": paced_runs, "half_load_sustained": sustained,
            "half_load_small_requests": small, "half_load_small_requests_spread": small_spread,
            "disk_sync": disk}


# Events of the long paced run: four times the short ones (30-45 s at half load on the machines
# it has run on).
SUSTAINED_EVENTS = 4_000_000


# Where the acknowledgement tail at half load comes from: the same paced run with one cause
# taken away at a time.
LATENCY_VARIANTS = [
    ("as configured (data on disk)", "", None),
    ("data directories on tmpfs (no disk)", "", "/dev/shm"),
    ("sealing off (rows stay in the Raft log)", "[storage]\nseal-rows = 100000000\nseal-interval = \"10h\"", None),
    ("sealing and snapshots off", "[storage]\nseal-rows = 100000000\nseal-interval = \"10h\"\n"
     "[consensus]\nsnapshot-every-entries = 100000000", None),
]


def bench_cluster_latency(rate, seed, workdir, events=600_000):
    """The half-load run of `bench_cluster` under each of LATENCY_VARIANTS (600,000 events each)."""
    out = []
    for name, extra, root in LATENCY_VARIANTS:
        base = Path(root) / "optiprism-bench-variant" if root else Path(workdir)
        try:
            r = ingest_into_cluster(Cluster(base, extra=extra), events, seed + 2, rate=rate)
        finally:
            if root:
                shutil.rmtree(base, ignore_errors=True)
        print(f"[cluster] {name}: p50 {r['latency_ms_p50']:.1f} ms, p99 {r['latency_ms_p99']:.1f} ms", flush=True)
        out.append({"variant": name, **r})
    return out


def ingest_into_cluster(cluster, events, seed, rate=None, batch=1000, concurrency=16, spread=False):
    """Sends `events` through member 2 of the freshly started `cluster` (or over every member with
    `spread`), then stops it."""
    try:
        return ingest(cluster.http if spread else [cluster.http[1]], events, seed, batch, concurrency, rate=rate)
    finally:
        cluster.stop()


def gen_args(events, seed):
    return ["--events", str(events), "--seed", str(seed), "--days", "90", "--start", "2024-01-01"]


def ingest(targets, events, seed, batch, concurrency, rate=None):
    """Sends `events` with `prismctl gen` to the HTTP addresses `targets`, batch k to target k
    modulo their number; returns its report."""
    pace = ["--rate", str(rate)] if rate else []
    to = [arg for url in targets for arg in ("--target", url)]
    out = subprocess.check_output(
        [binary("prismctl"), "gen", *gen_args(events, seed), *to, "--write-key", WRITE_KEY,
         "--batch-size", str(batch), "--concurrency", str(concurrency), "--json", *pace], stderr=subprocess.DEVNULL)
    return json.loads(out.decode().strip().splitlines()[-1])


# Each query class: our JSON, the same question in DuckDB and ClickHouse SQL, and how to read
# each engine's rows into one comparable answer. ClickHouse SQL names its table `{events}`: the
# MergeTree ordered by (event, timestamp) for "chDB", and for the per-person classes also the
# copy ordered by (distinct_id, timestamp) for "chDB sorted".
MS_DAY = 86_400_000
MS_WEEK = 7 * MS_DAY
T_2024_01_01 = 1_704_067_200_000


def utc_ms(day):
    """Milliseconds of a UTC midnight, `day` as YYYY-MM-DD."""
    import datetime
    d = datetime.date.fromisoformat(day)
    return T_2024_01_01 + (d - datetime.date(2024, 1, 1)).days * MS_DAY


def duck_range(a, b):
    return f"\"timestamp\" >= TIMESTAMPTZ '{a} 00:00:00+00' AND \"timestamp\" < TIMESTAMPTZ '{b} 00:00:00+00'"


def ch_range(a, b):
    return f"timestamp >= toDateTime64('{a} 00:00:00', 3, 'UTC') AND timestamp < toDateTime64('{b} 00:00:00', 3, 'UTC')"


def num(x):
    """A number from a DuckDB value or a ClickHouse TSV field (None for NULL)."""
    if x is None or x in ("", "\\N"):
        return None
    return float(x)


def text(x):
    return None if x is None or x == "\\N" else str(x)


# Readers of the engines' rows (DuckDB tuples, ClickHouse TSV fields) into comparable answers.

def rows_by_bucket(rows):
    """Trends: {bucket label or None for the range total: value}, zeros left out."""
    return {text(b): num(v) for b, v in rows if num(v)}


def rows_by_label_bucket(rows):
    """Trends with a breakdown: {(label or None, bucket or None): value}, zeros left out."""
    return {(text(l), text(b)): num(v) for b, l, v in rows if num(v)}


def rows_funnel(rows):
    """Funnel: the step counts."""
    return tuple(int(num(x) or 0) for x in rows[0])


RETENTION_START = "2024-01-01"
RETENTION_WEEKS = 12  # 2024-01-01 .. 2024-03-24, Monday weeks
RETENTION_PERIODS = 8


def rows_retention(rows):
    """Retention: {(cohort label, period): retained or None}; rows are (cohort index, period,
    units) with period 0 the cohort size; cells past the last week of the range are null."""
    import datetime
    got = {(int(num(c)), int(num(k))): int(num(n)) for c, k, n in rows}
    out = {}
    for c in range(RETENTION_WEEKS):
        label = (datetime.date(2024, 1, 1) + datetime.timedelta(weeks=c)).isoformat()
        for k in range(RETENTION_PERIODS):
            out[(label, k)] = float(got.get((c, k), 0)) if k == 0 or c + k < RETENTION_WEEKS else None
    return out


def rows_paths(rows):
    """Paths: the kept edges {(source, target): (value, avg_seconds)} from the 50 heaviest
    (ordered by value desc, source, target), dropping edges whose source is neither at position 1
    nor reached by a kept edge (the pass over at most 50 rows runs in Python for both peers)."""
    edges = [(text(s), text(t), int(num(v)), num(a)) for s, t, v, a in rows]
    reachable = set()
    for s, t, _, _ in sorted(edges, key=lambda e: int(e[0].split("_", 1)[0])):
        if s.startswith("1_") or s in reachable:
            reachable.add(t)
    return {(s, t): (v, a) for s, t, v, a in edges if s.startswith("1_") or s in reachable}


def same_paths(a, b):
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and abs(a[k][1] - b[k][1]) <= 1e-3 for k in a)


# Readers of our Arrow answers (a list of row dicts).

def ours_trends(rows, by_breakdown=False):
    out = {}
    for r in rows:
        if by_breakdown:
            if r["breakdown"] is not None and r["bucket"] is None:
                out[r["breakdown"]] = r["value"]
            elif r["breakdown"] is None and r["bucket"] is None and r["value"]:
                out[None] = r["value"]
        elif r["breakdown"] is None and r["value"]:
            out[r["bucket"]] = r["value"]
    return out


def ours_breakdown_cells(rows):
    return {(r["breakdown"], r["bucket"]): r["value"] for r in rows if r["value"]}


def ours_funnel(rows):
    return tuple(r["count"] for r in sorted((r for r in rows if r["breakdown"] is None), key=lambda r: r["step"]))


def ours_retention(rows):
    return {(r["cohort"], r["period"]): r["retained"] for r in rows}


def ours_paths(rows):
    return {(r["source"], r["target"]): (r["value"], r["avg_seconds"]) for r in rows if r["kind"] == "edge"}


def queries():
    """The peers' SQL groups by the truncated instant and formats only the result rows, the
    fastest form we found for each engine (formatting every row as text first is much slower)."""
    rng = {"from": "2024-01-01", "to": "2024-03-30"}
    utc_range_duck = duck_range("2024-01-01", "2024-03-31")
    utc_range_ch = ch_range("2024-01-01", "2024-03-31")

    def duck_daily(agg, where, tz="UTC"):
        return (f"SELECT strftime(d, '%Y-%m-%d') AS b, v FROM (SELECT date_trunc('day', timezone('{tz}', \"timestamp\")) AS d,"
                f" {agg} AS v FROM events WHERE {where} GROUP BY ROLLUP (d))")

    def ch_daily(agg, where, tz="UTC"):
        return (f"SELECT toString(d) AS b, v FROM (SELECT toDate(timestamp, '{tz}') AS d, {agg} AS v FROM {{events}}"
                f" WHERE {where} GROUP BY d WITH ROLLUP) SETTINGS group_by_use_nulls = 1")

    ny_duck = "\"timestamp\" >= TIMESTAMPTZ '2024-01-01 05:00:00+00' AND \"timestamp\" < TIMESTAMPTZ '2024-03-31 04:00:00+00'"
    ny_ch = "timestamp >= toDateTime64('2024-01-01 05:00:00', 3, 'UTC') AND timestamp < toDateTime64('2024-03-31 04:00:00', 3, 'UTC')"
    week_duck = duck_range("2024-02-05", "2024-02-12")
    week_ch = ch_range("2024-02-05", "2024-02-12")
    trends = {"ours_read": ours_trends, "peer_read": rows_by_bucket}
    classes = [
        {
            "name": "daily total (pageview)",
            "ours": {"kind": "trends", "date_range": rng, "interval": "day", "series": [{"event": "pageview", "math": "total"}]},
            "duckdb": duck_daily("count(*)", f"event = 'pageview' AND {utc_range_duck}"),
            "clickhouse": ch_daily("count()", f"event = 'pageview' AND {utc_range_ch}"),
            **trends,
        },
        {
            "name": "daily unique users (pageview)",
            "ours": {"kind": "trends", "date_range": rng, "interval": "day", "series": [{"event": "pageview", "math": "unique_users"}]},
            "duckdb": duck_daily("count(DISTINCT distinct_id)", f"event = 'pageview' AND {utc_range_duck}"),
            "clickhouse": ch_daily("uniqExact(distinct_id)", f"event = 'pageview' AND {utc_range_ch}"),
            **trends,
        },
        {
            "name": "daily total, New York time, filtered (click, $browser = Chrome)",
            "ours": {"kind": "trends", "timezone": "America/New_York", "date_range": rng, "interval": "day",
                     "series": [{"event": "click", "math": "total", "filters": [{"key": "$browser", "op": "eq", "value": "Chrome"}]}]},
            "duckdb": duck_daily("count(*)", f"event = 'click' AND \"$browser\" = 'Chrome' AND {ny_duck}", "America/New_York"),
            "clickhouse": ch_daily("count()", f"event = 'click' AND `$browser` = 'Chrome' AND {ny_ch}", "America/New_York"),
            **trends,
        },
        {
            "name": "unique users by $browser (all events)",
            "ours": {"kind": "trends", "date_range": rng, "interval": "month", "series": [{"math": "unique_users"}],
                     "breakdown": {"property": "$browser", "limit": 25}},
            "duckdb": f"""SELECT coalesce("$browser", '(none)') AS b, count(DISTINCT distinct_id) AS v FROM events
                         WHERE {utc_range_duck} GROUP BY ROLLUP (b)""",
            "clickhouse": f"""SELECT ifNull(`$browser`, '(none)') AS b, uniqExact(distinct_id) AS v FROM {{events}}
                             WHERE {utc_range_ch} GROUP BY b WITH ROLLUP SETTINGS group_by_use_nulls = 1""",
            "ours_read": lambda rows: ours_trends(rows, True), "peer_read": rows_by_bucket,
        },
        {
            "name": "hourly total, one week (all events)",
            "ours": {"kind": "trends", "date_range": {"from": "2024-02-05", "to": "2024-02-11"}, "interval": "hour",
                     "series": [{"math": "total"}]},
            "duckdb": f"""SELECT strftime(h, '%Y-%m-%dT%H:00:00+00:00') AS b, v FROM (SELECT date_trunc('hour', timezone('UTC', "timestamp")) AS h,
                         count(*) AS v FROM events WHERE {week_duck} GROUP BY ROLLUP (h))""",
            "clickhouse": f"""SELECT formatDateTime(h, '%Y-%m-%dT%H:00:00+00:00', 'UTC') AS b, v FROM (SELECT toStartOfHour(timestamp, 'UTC') AS h,
                             count() AS v FROM {{events}} WHERE {week_ch} GROUP BY h WITH ROLLUP) SETTINGS group_by_use_nulls = 1""",
            **trends,
        },
    ]

    # Top-20 breakdown: every (month, label) cell, each label's range total, and the unbroken
    # month and range totals; labels beyond the 20 with the most users (ties by label) fold into
    # "(other)", whose value is the distinct count of users over all folded values.
    classes.append({
        "name": "unique users by country, top 20 + (other) (all events)",
        "ours": {"kind": "trends", "date_range": rng, "interval": "month", "series": [{"math": "unique_users"}],
                 "breakdown": {"property": "country", "limit": 20}},
        # One scan to the distinct (month, value, unit) triples, then the ranking and the folded
        # counts on those (DuckDB: a materialized CTE read twice; ClickHouse: the distinct count
        # per value as a window aggregate, then the rank by users desc, label).
        "duckdb": f"""WITH d AS MATERIALIZED (SELECT DISTINCT date_trunc('month', timezone('UTC', "timestamp")) AS m,
                                        coalesce(country, '(none)') AS v, distinct_id AS u FROM events WHERE {utc_range_duck}),
                     top AS (SELECT v FROM d GROUP BY v ORDER BY count(DISTINCT u) DESC, v LIMIT 20)
                     SELECT strftime(m, '%Y-%m-%d') AS b, l, n FROM (
                       SELECT m, CASE WHEN v IN (SELECT v FROM top) THEN v ELSE '(other)' END AS l, count(DISTINCT u) AS n
                       FROM d GROUP BY GROUPING SETS ((m, l), (l), (m), ()))""",
        "clickhouse": f"""SELECT toString(m) AS b, l, n FROM (
                           SELECT m, if(rank <= 20, v, '(other)') AS l, uniqExact(u) AS n FROM (
                             SELECT m, v, u, dense_rank() OVER (ORDER BY n DESC, v) AS rank FROM (
                               SELECT m, v, u, uniqExact(u) OVER (PARTITION BY v) AS n FROM (
                                 SELECT toStartOfMonth(timestamp, 'UTC') AS m, ifNull(country, '(none)') AS v, distinct_id AS u
                                 FROM {{events}} WHERE {utc_range_ch} GROUP BY m, v, u)))
                           GROUP BY GROUPING SETS ((m, l), (l), (m), ()))
                         SETTINGS group_by_use_nulls = 1""",
        "ours_read": ours_breakdown_cells, "peer_read": rows_by_label_bucket,
    })

    # Funnel: view_item -> add_to_cart -> purchase, 7 days from step 1, best attempt. Step 1 in
    # [from, to + 1 day); later steps up to to + 1 day + window.
    window = 7 * MS_DAY
    entry_end = utc_ms("2024-03-31")
    classes.append({
        "name": "funnel, 3 steps, 7 days (view_item > add_to_cart > purchase)",
        "ours": {"kind": "funnel", "date_range": rng,
                 "steps": [{"event": "view_item"}, {"event": "add_to_cart"}, {"event": "purchase"}],
                 "window_seconds": window // 1000, "order": "ordered", "attempt_policy": "best"},
        # For each step-1 event the earliest step 2 at or after it, then the earliest step 3 at or
        # after that (greedy earliest is optimal for an ordered funnel); a unit's level is the
        # best over its attempts.
        "duckdb": f"""WITH s AS (SELECT distinct_id, event, epoch_ms("timestamp") AS t FROM events
                                WHERE event IN ('view_item', 'add_to_cart', 'purchase')
                                  AND {duck_range("2024-01-01", "2024-04-07")}),
                     s1 AS (SELECT distinct_id, t AS t1 FROM s WHERE event = 'view_item' AND t < {entry_end}),
                     s2 AS (SELECT distinct_id, t AS t2 FROM s WHERE event = 'add_to_cart'),
                     s3 AS (SELECT distinct_id, t AS t3 FROM s WHERE event = 'purchase'),
                     a AS (SELECT s1.distinct_id, t1, t2 FROM s1 ASOF LEFT JOIN s2
                           ON s1.distinct_id = s2.distinct_id AND s2.t2 >= s1.t1),
                     b AS (SELECT a.distinct_id, t1, t2, t3 FROM a ASOF LEFT JOIN s3
                           ON a.distinct_id = s3.distinct_id AND s3.t3 >= a.t2),
                     u AS (SELECT distinct_id, max(CASE WHEN t2 IS NULL OR t2 - t1 > {window} THEN 1
                                                        WHEN t3 IS NULL OR t3 - t1 > {window} THEN 2 ELSE 3 END) AS l
                           FROM b GROUP BY distinct_id)
                     SELECT count(*), count(*) FILTER (WHERE l >= 2), count(*) FILTER (WHERE l >= 3) FROM u""",
        # windowFunnel takes no DateTime64: the window is in the unit of the timestamp argument,
        # here UInt64 milliseconds (seconds would round step times to the second).
        "clickhouse": f"""SELECT countIf(l >= 1), countIf(l >= 2), countIf(l >= 3) FROM (
                            SELECT windowFunnel({window})(toUInt64(toUnixTimestamp64Milli(timestamp)),
                                     event = 'view_item' AND timestamp < toDateTime64('2024-03-31 00:00:00', 3, 'UTC'),
                                     event = 'add_to_cart', event = 'purchase') AS l
                            FROM {{events}} WHERE event IN ('view_item', 'add_to_cart', 'purchase')
                              AND {ch_range("2024-01-01", "2024-04-07")}
                            GROUP BY distinct_id)""",
        "sorted": True,
        "ours_read": ours_funnel, "peer_read": rows_funnel,
    })

    # Weekly retention, first-time cohorts: a unit's cohort is the week of its first-ever
    # signup_completed if that week is in the range; retained in column k if it purchased in
    # week c + k (cells past the range's last week are null).
    r_from, r_end = utc_ms(RETENTION_START), utc_ms("2024-03-25")
    classes.append({
        "name": "weekly retention, first-time cohorts (signup_completed > purchase, 8 periods)",
        "ours": {"kind": "retention", "date_range": {"from": RETENTION_START, "to": "2024-03-24"},
                 "start": {"event": "signup_completed"}, "return": {"event": "purchase"},
                 "cohort_type": "first_time", "period": "week", "total_periods": RETENTION_PERIODS,
                 "time_mode": "calendar", "counting": "bounded"},
        "duckdb": f"""WITH f AS (SELECT distinct_id, min(epoch_ms("timestamp")) AS t0 FROM events
                                WHERE event = 'signup_completed' GROUP BY distinct_id),
                     c AS (SELECT distinct_id, (t0 - {r_from}) // {MS_WEEK} AS c FROM f WHERE t0 >= {r_from} AND t0 < {r_end}),
                     r AS (SELECT DISTINCT distinct_id, (epoch_ms("timestamp") - {r_from}) // {MS_WEEK} AS j FROM events
                           WHERE event = 'purchase' AND {duck_range(RETENTION_START, "2024-03-25")})
                     SELECT c, 0 AS k, count(*) FROM c GROUP BY c
                     UNION ALL
                     SELECT c.c, r.j - c.c AS k, count(*) FROM c JOIN r USING (distinct_id)
                     WHERE r.j > c.c AND r.j - c.c < {RETENTION_PERIODS} GROUP BY ALL""",
        # One pass grouped by unit: first signup and the set of purchase weeks.
        "clickhouse": f"""SELECT c, k, count() FROM (
                            SELECT intDiv(t0 - {r_from}, {MS_WEEK}) AS c,
                                   arrayJoin(arrayConcat([0], arrayFilter(x -> x >= 1 AND x < {RETENTION_PERIODS},
                                                                          arrayMap(j -> j - c, js)))) AS k
                            FROM (SELECT minIf(toUnixTimestamp64Milli(timestamp), event = 'signup_completed') AS t0,
                                         groupUniqArrayIf(intDiv(toUnixTimestamp64Milli(timestamp) - {r_from}, {MS_WEEK}),
                                                          event = 'purchase' AND {ch_range(RETENTION_START, "2024-03-25")}) AS js
                                  FROM {{events}} WHERE event IN ('signup_completed', 'purchase')
                                  GROUP BY distinct_id HAVING countIf(event = 'signup_completed') > 0)
                            WHERE t0 >= {r_from} AND t0 < {r_end})
                          GROUP BY c, k""",
        "sorted": True,
        "ours_read": ours_retention, "peer_read": rows_retention,
    })

    # Paths of page views in January: item = url (else $current_url) without a trailing slash;
    # instances split at gaps of 30 min or more; repeats collapse keeping the last event of a
    # run; first 5 items; edges weighted by instances with the mean seconds between the events.
    gap = 1800 * 1000
    duck_item = """CASE WHEN "$current_url" IS NULL THEN 'pageview'
                        WHEN length("$current_url") > 1 AND ends_with("$current_url", '/')
                        THEN left("$current_url", length("$current_url") - 1) ELSE "$current_url" END"""
    ch_item = """multiIf(`$current_url` IS NULL, 'pageview',
                         length(`$current_url`) > 1 AND endsWith(`$current_url`, '/'),
                         substring(`$current_url`, 1, length(`$current_url`) - 1), assumeNotNull(`$current_url`))"""
    classes.append({
        "name": "paths of page views, January (5 steps, 30 min sessions, top 50 edges)",
        "ours": {"kind": "paths", "date_range": {"from": "2024-01-01", "to": "2024-01-31"}, "event_types": ["pageview"],
                 "session_gap_seconds": gap // 1000, "step_limit": 5, "edge_limit": 50},
        "duckdb": f"""WITH e AS (SELECT distinct_id, epoch_ms("timestamp") AS t, {duck_item} AS item FROM events
                                WHERE event = 'pageview' AND {duck_range("2024-01-01", "2024-02-01")}),
                     n AS (SELECT *, lag(t) OVER w AS pt, lead(t) OVER w AS nt, lead(item) OVER w AS ni
                           FROM e WINDOW w AS (PARTITION BY distinct_id ORDER BY t)),
                     k AS (SELECT distinct_id, t, item, nt, ni,
                                  sum(CASE WHEN pt IS NULL OR t - pt >= {gap} THEN 1 ELSE 0 END)
                                    OVER (PARTITION BY distinct_id ORDER BY t ROWS UNBOUNDED PRECEDING) AS inst
                           FROM n),
                     p AS (SELECT row_number() OVER w AS pos, t, item, lead(t) OVER w AS t2, lead(item) OVER w AS item2
                           FROM k WHERE nt IS NULL OR nt - t >= {gap} OR ni <> item
                           WINDOW w AS (PARTITION BY distinct_id, inst ORDER BY t))
                     SELECT pos || '_' || item AS source, (pos + 1) || '_' || item2 AS target, count(*) AS value,
                            avg((t2 - t) / 1000.0) AS avg_seconds
                     FROM p WHERE pos < 5 AND item2 IS NOT NULL GROUP BY ALL ORDER BY value DESC, source, target LIMIT 50""",
        "clickhouse": f"""SELECT concat(toString(pos), '_', item) AS source, concat(toString(pos + 1), '_', item2) AS target,
                                count() AS value, avg((t2 - t) / 1000) AS avg_seconds
                         FROM (
                           SELECT row_number() OVER w AS pos, t, item,
                                  leadInFrame(toNullable(t)) OVER w1 AS t2, leadInFrame(toNullable(item)) OVER w1 AS item2
                           FROM (
                             SELECT distinct_id, t, item, nt, ni,
                                    sum(if(pt IS NULL OR t - pt >= {gap}, 1, 0))
                                      OVER (PARTITION BY distinct_id ORDER BY t ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS inst
                             FROM (
                               SELECT distinct_id, t, item,
                                      lagInFrame(toNullable(t)) OVER (PARTITION BY distinct_id ORDER BY t
                                                                     ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS pt,
                                      leadInFrame(toNullable(t)) OVER w0 AS nt, leadInFrame(toNullable(item)) OVER w0 AS ni
                               FROM (SELECT distinct_id, toUnixTimestamp64Milli(timestamp) AS t, {ch_item} AS item
                                     FROM {{events}} WHERE event = 'pageview' AND {ch_range("2024-01-01", "2024-02-01")})
                               WINDOW w0 AS (PARTITION BY distinct_id ORDER BY t ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING)))
                           WHERE nt IS NULL OR nt - t >= {gap} OR ni != item
                           WINDOW w AS (PARTITION BY distinct_id, inst ORDER BY t),
                                  w1 AS (PARTITION BY distinct_id, inst ORDER BY t ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING))
                         WHERE pos < 5 AND item2 IS NOT NULL GROUP BY source, target ORDER BY value DESC, source, target LIMIT 50""",
        "sorted": True,
        "ours_read": ours_paths, "peer_read": rows_paths, "same": same_paths,
    })

    # Cohort filter: daily unique page viewers among units with at least 2 purchases (all time).
    buyers_duck = "SELECT distinct_id FROM events WHERE event = 'purchase' GROUP BY distinct_id HAVING count(*) >= 2"
    buyers_ch = "SELECT distinct_id FROM {events} WHERE event = 'purchase' GROUP BY distinct_id HAVING count() >= 2"
    classes.append({
        "name": "daily unique users (pageview) in cohort: purchase >= 2 times",
        "ours": {"kind": "trends", "date_range": rng, "interval": "day", "series": [{"event": "pageview", "math": "unique_users"}],
                 "filters": [{"op": "in_cohort", "cohort": {"type": "event_count", "entity": {"event": "purchase"},
                                                            "operator": "gte", "value": 2}}]},
        "duckdb": duck_daily("count(DISTINCT distinct_id)", f"event = 'pageview' AND {utc_range_duck} AND distinct_id IN ({buyers_duck})"),
        "clickhouse": ch_daily("uniqExact(distinct_id)", f"event = 'pageview' AND {utc_range_ch} AND distinct_id IN ({buyers_ch})"),
        "sorted": True,
        **trends,
    })
    return classes


QUERY_CLASS_NOTES = [
    "- **Trends** (daily total, daily unique users, New York time with a filter, hourly): `GROUP BY` the",
    "  truncated instant `WITH ROLLUP` (ClickHouse) / `GROUP BY ROLLUP` (DuckDB); uniques are exact",
    "  (`uniqExact`, `count(DISTINCT)`).",
    "- **Top-20 breakdown** (unique users by country, monthly, `limit: 20`): one scan to the distinct",
    "  (month, value, unit) triples; on those, the values are ranked by distinct users over the range",
    "  (ties by label; DuckDB from a materialized CTE, ClickHouse with `uniqExact` as a window aggregate",
    "  and `dense_rank`), the rest fold into `(other)`, and `GROUPING SETS ((month, label), (label),",
    "  (month), ())` counts distinct users, so `(other)` is the distinct count over all folded values, as",
    "  ours. Compared: every (label, month) cell, each label's range total and the unbroken totals.",
    "- **Funnel** (view_item → add_to_cart → purchase, 7 days, ordered, best attempt): DuckDB takes, for",
    "  each step-1 event in the range, the earliest step 2 at or after it and then the earliest step 3 at",
    "  or after that with two `ASOF LEFT JOIN`s (greedy earliest is optimal for an ordered funnel), keeps",
    "  the best level per unit; ClickHouse uses `windowFunnel(604800000)` over",
    "  `toUInt64(toUnixTimestamp64Milli(timestamp))` (windowFunnel rejects `DateTime64`; the window is in",
    "  the unit of the timestamp argument, and whole seconds would round step times), with step 1",
    "  restricted to the range and later steps read up to `to` + 1 day + 7 days, `GROUP BY distinct_id`.",
    "  Compared: the three step counts.",
    "- **Retention** (first-time weekly cohorts of `signup_completed`, return `purchase`, 8 periods,",
    "  calendar weeks from Monday 2024-01-01, bounded): the first-ever start per unit, its week index,",
    "  and the distinct (unit, purchase week) pairs; DuckDB joins the two, ClickHouse does it in one",
    "  pass grouped by unit (`minIf` and `groupUniqArrayIf`, then `arrayJoin` of the periods). Compared:",
    "  every cell, nulls past the last week of the range included.",
    "- **Paths** (page views in January, 30-minute sessions, 5 steps, 50 edges): window functions in",
    "  both (`lag`/`lead`, DuckDB; `lagInFrame`/`leadInFrame`, ClickHouse): a running sum of",
    "  gaps ≥ 30 min numbers the sessions, an event is kept when the next event of its session has",
    "  another item (the last event of a run of repeats), `row_number()` gives positions, `lead` the",
    "  edges; the 50 heaviest by (value desc, source, target) in SQL, and the pass that drops edges not",
    "  reachable from position 1 in Python over those 50 rows. Compared: edges, values, and mean seconds",
    "  to 1e-3.",
    "- **Cohort filter** (daily unique page viewers among units with ≥ 2 purchases, all time): the",
    "  daily-uniques query with `distinct_id IN (SELECT distinct_id … GROUP BY distinct_id HAVING",
    "  count() >= 2)`.",
]


def load_peers(table, workdir, events):
    """DuckDB: an in-memory native table. chDB: a MergeTree ordered by (event, timestamp), and a
    copy ordered by (distinct_id, timestamp) for the per-person classes."""
    import duckdb, chdb.session, pyarrow.parquet
    duck = duckdb.connect()
    duck.execute("SET TimeZone = 'UTC'")
    duck.register("arrow_events", table)
    duck.execute("CREATE TABLE events AS SELECT * FROM arrow_events")
    duck.unregister("arrow_events")

    parquet_path = workdir / f"events-{events}.parquet"
    pyarrow.parquet.write_table(table, str(parquet_path))
    ch = chdb.session.Session(str(workdir / f"chdb-{events}"))
    columns = """(uuid String, event LowCardinality(String), timestamp DateTime64(3, 'UTC'),
                distinct_id String, `$session_id` Nullable(String), `$browser` LowCardinality(Nullable(String)),
                `$os` LowCardinality(Nullable(String)), country LowCardinality(Nullable(String)),
                plan LowCardinality(Nullable(String)), `$current_url` Nullable(String), search_term Nullable(String),
                price Nullable(Float64), duration_ms Nullable(Float64), is_mobile Nullable(Bool))"""
    for name, order in (("events", "event, timestamp"), ("events_by_user", "distinct_id, timestamp")):
        ch.query(f"DROP TABLE IF EXISTS {name}")
        ch.query(f"CREATE TABLE {name} {columns} ENGINE = MergeTree ORDER BY ({order})")
        ch.query(f"INSERT INTO {name} SELECT * FROM file('{parquet_path}', Parquet)")
        ch.query(f"OPTIMIZE TABLE {name} FINAL")
    parquet_path.unlink(missing_ok=True)
    return duck, ch


def run_classes(node, duck, ch, runs, only):
    """Every class on Optiprism and its peers; the rows of the report."""
    import pyarrow.flight as fl
    client = fl.FlightClient("grpc://" + node.flight)
    options = fl.FlightCallOptions(headers=[(b"authorization", ("Bearer " + TOKEN).encode())])
    out = []
    for q in queries():
        if only and not any(o.lower() in q["name"].lower() for o in only):
            continue
        same = q.get("same", lambda a, b: a == b)
        row = {"name": q["name"]}
        engines = {"optiprism": lambda: q["ours_read"](
            client.do_get(fl.Ticket(json.dumps(q["ours"]).encode()), options).read_all().to_pylist())}
        engines["duckdb"] = lambda: q["peer_read"](duck.execute(q["duckdb"]).fetchall())

        def ch_run(table):
            sql = q["clickhouse"].replace("{events}", table)
            return lambda: q["peer_read"]([tuple(r.split("\t")) for r in str(ch.query(sql, "TSV")).strip().splitlines()])
        engines["chdb"] = ch_run("events")
        if q.get("sorted"):
            engines["chdb_sorted"] = ch_run("events_by_user")
        peers = [name for name in engines if name != "optiprism"]
        # The first call of each engine is the warm-up and gives its answer; the timed runs then
        # take turns between the engines, so a burst of other load on the machine hits them alike.
        answers = {}
        try:
            answers["optiprism"] = engines["optiprism"]()
        except Exception as e:  # the node refused or failed the query
            message = str(e).strip().splitlines()[0]
            message = message.split("message: ", 1)[-1].split(", expected")[0]
            row["optiprism_error"] = message[:200]
            print(f"  {q['name']}: Optiprism refused it: {row['optiprism_error']}", flush=True)
            del engines["optiprism"]
        for name in peers:
            answers[name] = engines[name]()
        samples = {name: [] for name in engines}
        for _ in range(runs):
            for name, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        for name in peers:
            row[f"{name}_s"] = statistics.median(samples[name])
        ours = answers.pop("optiprism", None)
        ours_t = statistics.median(samples["optiprism"]) if ours is not None else None
        first = next(iter(answers.values()))
        peers_agree = all(same(first, a) for a in answers.values())
        row["peers_agree"] = peers_agree
        row["optiprism_s"] = ours_t
        best = min(row[f"{name}_s"] for name in peers)
        row["best_peer_s"] = best
        if ours is not None:
            row["ratio_to_best_peer"] = ours_t / best
            row["answers_agree"] = peers_agree and same(ours, first)
        else:
            row["answers_agree"] = None
        if not peers_agree or (ours is not None and not row["answers_agree"]):
            show = {"optiprism": ours, **answers}
            if isinstance(first, dict):
                keys = set().union(*(a.keys() for a in show.values() if isinstance(a, dict)))
                diff = {k: tuple(a.get(k) if isinstance(a, dict) else None for a in show.values()) for k in keys
                        if len({json.dumps(a.get(k) if isinstance(a, dict) else None) for a in show.values()}) > 1}
                print(f"  answers differ for {q['name']} (optiprism, {', '.join(answers)}): "
                      f"{dict(sorted(diff.items(), key=str)[:6])}", flush=True)
            else:
                print(f"  answers differ for {q['name']}: {show}", flush=True)
        times = ", ".join(f"{n} {row[f'{n}_s']*1000:.1f} ms" for n in peers)
        ours_text = f"optiprism {ours_t*1000:.1f} ms" if ours_t is not None else "optiprism refused"
        ratio = f", ratio {row['ratio_to_best_peer']:.2f}" if ours is not None else ""
        print(f"  {q['name']}: {ours_text}, {times}{ratio}, agree={row['answers_agree']}", flush=True)
        out.append(row)
    return out


def bench_size(events, seed, runs, workdir, queries_only=False, only=()):
    import pyarrow.feather
    result = {"events": events}
    arrow_path = workdir / f"events-{events}.arrow"
    print(f"[{events:,}] generating the Arrow file for the peers", flush=True)
    subprocess.check_call([binary("prismctl"), "gen", *gen_args(events, seed), "--out", str(arrow_path)], stderr=subprocess.DEVNULL)
    table = pyarrow.feather.read_table(str(arrow_path))

    if not queries_only:
        # Ingestion, batches of 100 (on at most 1M events) on a node of its own.
        small = min(events, 1_000_000)
        data = workdir / f"prism-{events}-b100" / "data"
        data.parent.mkdir(parents=True, exist_ok=True)
        node = Node(data)
        print(f"[{events:,}] ingesting {small:,} events in batches of 100", flush=True)
        result["ingest_batch_100"] = ingest([node.http], small, seed, 100, 32)
        node.stop()
        shutil.rmtree(data.parent, ignore_errors=True)

    data = workdir / f"prism-{events}" / "data"
    data.parent.mkdir(parents=True, exist_ok=True)
    node = Node(data)
    try:
        print(f"[{events:,}] ingesting {events:,} events in batches of 1,000", flush=True)
        ingested = ingest([node.http], events, seed, 1000, 16)
        print(f"[{events:,}] ingestion: {ingested['events_per_second']:,.0f} events/s (batches of 1,000)", flush=True)
        if not queries_only:
            result["ingest_batch_1000"] = ingested
        print(f"[{events:,}] loading DuckDB and chDB", flush=True)
        duck, ch = load_peers(table, workdir, events)
        del table
        result["queries"] = run_classes(node, duck, ch, runs, only)
    finally:
        node.stop()
        shutil.rmtree(data.parent, ignore_errors=True)
        shutil.rmtree(workdir / f"chdb-{events}", ignore_errors=True)
        arrow_path.unlink(missing_ok=True)
    return result


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import duckdb, chdb
    return {"cpus": os.cpu_count(), "cpu": cpu, "duckdb": duckdb.__version__, "chdb": chdb.__version__}


def write_markdown(results):
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Reproduce: `cargo build --release --bin prism --bin prismctl && python3 bench/run.py"
        + "".join(f" --events {r['events']}" for r in results["sizes"]) + "`",
        "(`bench/run.py` installs DuckDB and chDB from PyPI into its own venv; `--queries-only` skips the",
        "ingestion benchmarks and keeps their recorded figures, `--only TEXT` runs the query classes whose",
        "name contains TEXT, `--report-only` rewrites this page from `bench/results.json`). Everything runs",
        f"on the same machine in the same run: {m['cpus']} cores ({m['cpu']}), DuckDB {m['duckdb']}, chDB {m['chdb']}.",
        "Data: `prismctl gen` with seed 42 (power-law activity, ~50 event types, 90 days, sessions, typed",
        "properties; no identity merges, so persons are distinct ids). Optiprism: one node (`prism up`,",
        "8 partitions, replication factor 1), queried over Arrow Flight with the JSON query as ticket",
        "(end-to-end time including the network round trip); DuckDB: an in-memory native table; chDB: a",
        "MergeTree table ordered by (event, timestamp) and, for the per-person classes, also a copy ordered",
        "by (distinct_id, timestamp) (\"chDB sorted\"). Every peer computes the same answer as ours (for",
        "trends the per-bucket values and the range total, `ROLLUP`), and the answers are cross-checked.",
        "Times are medians of 5 runs after a warm-up, the engines taking turns run by run.",
        "",
        "## Ingestion (HTTP, Segment batches, durable: acknowledged after commit and flush)",
        "",
        "| events | batch size | clients in flight | events/s | ack latency p50 | p99 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["sizes"]:
        for key in ("ingest_batch_100", "ingest_batch_1000"):
            if key not in r:
                continue
            i = r[key]
            lines.append(f"| {i['events']:,} | {i['batch_size']:,} | {i['concurrency']} | {i['events_per_second']:,.0f} |"
                         f" {i['latency_ms_p50']:.1f} ms | {i['latency_ms_p99']:.1f} ms |")
    c = results.get("cluster")
    if c:
        full, half = c["full"], c["half_load"]
        share = full["events_per_second"] / c["single"]["events_per_second"]
        lines += ["", "## Ingestion into a three-node cluster (replication factor 3, same machine)", "",
                  "Three `prism node` members on 127.0.0.1–3 share the two cores with the load generator; every",
                  "partition is replicated on all three, and an event is acknowledged once a majority flushed it.",
                  "The cluster has 8 partitions, as the one node it is compared with has (a cluster's default and",
                  "the repository's `cluster.toml` have 16: on these two cores that costs about a fifth of full",
                  "speed, as the notes below show).",
                  "The generator sends to member 2; partition leaders start spread over the members, so member 2",
                  "forwards the events of the partitions it does not lead to their leaders over QUIC. The one-node",
                  "figure it is compared with is measured in the same run, in alternating rounds (one node, then",
                  "the cluster, each on fresh data directories); the table shows the round with the median share."
                  + (f" Measured on {c['machine']['cpus']} cores of `{c['machine']['cpu']}` (the query tables above may come"
                     " from another machine of the same size)." if c.get("machine") else ""), "",
                  "| load | events | events/s | share of one node | ack latency p50 | p99 |",
                  "|---|---:|---:|---:|---:|---:|"]
        single = c["single"]
        lines.append(f"| one node, same round, 16 clients | {single['events']:,} | {single['events_per_second']:,.0f} |"
                     f" | {single['latency_ms_p50']:.1f} ms | {single['latency_ms_p99']:.1f} ms |")
        lines += [f"| three members, full speed, 16 clients | {full['events']:,} | {full['events_per_second']:,.0f} |"
                  f" {share:.0%} | {full['latency_ms_p50']:.1f} ms | {full['latency_ms_p99']:.1f} ms |",
                  f"| three members, paced at half of that | {half['events']:,} | {half['events_per_second']:,.0f} | |"
                  f" {half['latency_ms_p50']:.1f} ms | {half['latency_ms_p99']:.1f} ms |"]
        sustained = c.get("half_load_sustained")
        if sustained:
            lines.append(f"| three members, the same pace sustained | {sustained['events']:,} |"
                         f" {sustained['events_per_second']:,.0f} | | {sustained['latency_ms_p50']:.1f} ms |"
                         f" {sustained['latency_ms_p99']:.1f} ms |")
        for key, load in (("half_load_small_requests", "the same pace in requests of 100, 64 clients"),
                          ("half_load_small_requests_spread", "the same, spread over the three members")):
            r = c.get(key)
            if r:
                lines.append(f"| three members, {load} | {r['events']:,} | {r['events_per_second']:,.0f} | |"
                             f" {r['latency_ms_p50']:.1f} ms | {r['latency_ms_p99']:.1f} ms |")
        if c.get("rounds"):
            shares = ", ".join(f"{r['full']['events_per_second'] / r['single']['events_per_second']:.0%}"
                               f" ({r['full']['events_per_second']:,.0f} / {r['single']['events_per_second']:,.0f})"
                               for r in c["rounds"])
            lines += ["", f"Every round (three members / one node): {shares}."]
        if c.get("half_load_runs"):
            tails = ", ".join(f"{r['latency_ms_p99']:.1f} ms" for r in c["half_load_runs"])
            lines += [f"Every paced run's p99 (the table shows the median): {tails}."]
        if sustained:
            lines += ["The sustained run goes on four times as long as the others, through seals and log segment",
                      "rotations, with the members' state growing all along. (Since proposals linger, a partition's",
                      "log reaches only about 1,500-1,800 entries in it, short of the 2,000 that start the first",
                      "snapshot: snapshots and log purges come later than this run.)"]
        disk = c.get("disk_sync")
        if disk:
            lines += ["", f"The data disk by itself, before the cluster runs (one writer appending 64 KiB and calling",
                      f"`fdatasync`, {disk['syncs']:,} times in {disk['seconds']} s): p50 {disk['ms_p50']:.2f} ms, p99"
                      f" {disk['ms_p99']:.2f} ms, p99.9 {disk['ms_p999']:.2f} ms, max {disk['ms_max']:.1f} ms. The three",
                      "members' logs share this disk, so one stall of the device holds every quorum at once."]
        variants = c.get("latency_variants")
        if variants:
            lines += ["", "Where the tail at half load comes from (`--cluster-latency`: the same paced run, 600,000",
                      "events, with one cause taken away at a time):", "",
                      "| variant | events/s | ack latency p50 | p99 |", "|---|---:|---:|---:|"]
            for v in variants:
                lines.append(f"| {v['variant']} | {v['events_per_second']:,.0f} | {v['latency_ms_p50']:.1f} ms |"
                             f" {v['latency_ms_p99']:.1f} ms |")
    lines += ["", "## Queries", ""]
    for r in results["sizes"]:
        rows = r.get("queries", [])
        lines += [f"### {r['events']:,} events", "",
                  "| query | Optiprism | DuckDB | chDB | chDB sorted | Optiprism / best peer | answers agree |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        ratios = []
        for q in rows:
            def ms(key):
                v = q.get(key)
                return f"{v*1000:.1f} ms" if v is not None else "–"
            if q.get("optiprism_s") is None:
                ours, ratio, agree = "refused", "–", "– (refused)"
            else:
                best = q.get("best_peer_s") or min(q[k] for k in ("duckdb_s", "chdb_s", "chdb_sorted_s") if q.get(k) is not None)
                ratios.append(q["optiprism_s"] / best)
                ours, ratio, agree = ms("optiprism_s"), f"{q['optiprism_s'] / best:.2f}", "yes" if q["answers_agree"] else "NO"
            lines.append(f"| {q['name']} | {ours} | {ms('duckdb_s')} | {ms('chdb_s')} | {ms('chdb_sorted_s')} | {ratio} | {agree} |")
        if ratios:
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            lines += ["", f"Geometric mean of Optiprism / best peer over the {len(ratios)} classes Optiprism answered: **{geo:.2f}**."]
        refused = [q for q in rows if q.get("optiprism_s") is None]
        for q in refused:
            lines += ["", f"*{q['name']}*: the node refused the query ({q.get('optiprism_error', '')}); the peers"
                      f" {'agree' if q.get('peers_agree') else 'DISAGREE'} with each other."]
        lines.append("")
    lines += ["### Query classes and the peers' SQL", ""] + QUERY_CLASS_NOTES + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + results["notes"] + [""]
    (ROOT / "docs/benchmarks.md").write_text("\n".join(lines))


def main():
    ensure_venv()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, action="append", help="event count (repeatable)")
    p.add_argument("--sizes", action="append", default=[], help="event counts, comma-separated (same as --events)")
    p.add_argument("--queries-only", action="store_true",
                   help="skip the ingestion benchmarks (batches of 100 and 1,000, cluster): load the node, run the"
                        " query classes, and keep the recorded ingestion figures in bench/results.json")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only the query classes whose name contains TEXT (repeatable; case-insensitive);"
                        " the other classes' recorded rows are kept")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workdir", default=None)
    p.add_argument("--cluster-only", action="store_true",
                   help="measure only the three-node cluster's ingestion and add it to bench/results.json")
    p.add_argument("--cluster-latency", action="store_true",
                   help="with --cluster-only: also run the half-load run with the data on tmpfs, sealing off, and"
                        " sealing and snapshots off, to show where the acknowledgement tail comes from")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite docs/benchmarks.md from bench/results.json and bench/notes.md without measuring")
    args = p.parse_args()
    notes_path = ROOT / "bench/notes.md"
    if args.cluster_only:
        results = json.loads((ROOT / "bench/results.json").read_text())
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="optiprism-bench-"))
        results["cluster"] = bench_cluster(results["sizes"][0]["events"], args.seed, workdir)
        results["cluster"]["machine"] = machine()
        if args.cluster_latency:
            rate = results["cluster"]["half_load"]["events_per_second"]
            results["cluster"]["latency_variants"] = bench_cluster_latency(rate, args.seed, workdir)
        (ROOT / "bench/results.json").write_text(json.dumps(results, indent=2))
        args.report_only = True
    if args.report_only:
        results = json.loads((ROOT / "bench/results.json").read_text())
        results["notes"] = notes_path.read_text().strip().splitlines() if notes_path.exists() else []
        write_markdown(results)
        print("wrote docs/benchmarks.md")
        return
    sizes = (args.events or []) + [int(x) for part in args.sizes for x in part.split(",") if x.strip()]
    sizes = sizes or [1_000_000]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="optiprism-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = ROOT / "bench/results.json"
    if args.queries_only or args.only:
        # Part of a run: replace what was measured, keep the rest of bench/results.json.
        results = json.loads(results_path.read_text()) if results_path.exists() else {"sizes": []}
        results["machine"] = machine()
        if notes_path.exists():
            results["notes"] = notes_path.read_text().strip().splitlines()
        order = [q["name"] for q in queries()]
        for n in sizes:
            measured = bench_size(n, args.seed, args.runs, workdir, args.queries_only, args.only)
            entry = next((r for r in results["sizes"] if r["events"] == n), None)
            if entry is None:
                entry = {"events": n}
                results["sizes"].append(entry)
                results["sizes"].sort(key=lambda r: r["events"])
            for key, value in measured.items():
                if key != "queries":
                    entry[key] = value
            if args.only:
                rows = {q["name"]: q for q in entry.get("queries", [])}
                rows.update({q["name"]: q for q in measured["queries"]})
                entry["queries"] = sorted(rows.values(), key=lambda q: order.index(q["name"]) if q["name"] in order else len(order))
            else:
                entry["queries"] = measured["queries"]
            results_path.write_text(json.dumps(results, indent=2))
            write_markdown(results)
        print("wrote bench/results.json and docs/benchmarks.md")
        return
    results = {"machine": machine(), "sizes": []}
    if notes_path.exists():
        results["notes"] = notes_path.read_text().strip().splitlines()
    for n in sizes:
        results["sizes"].append(bench_size(n, args.seed, args.runs, workdir))
        results_path.write_text(json.dumps(results, indent=2))
        write_markdown(results)
    results["cluster"] = bench_cluster(sizes[0], args.seed, workdir)
    results_path.write_text(json.dumps(results, indent=2))
    write_markdown(results)
    print("wrote bench/results.json and docs/benchmarks.md")


if __name__ == "__main__":
    main()
