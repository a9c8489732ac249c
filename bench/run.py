#!/usr/bin/env python3
"""Optiprism benchmark: ingestion throughput, and trends queries against DuckDB and chDB.

Usage (from the repository root):

    cargo build --release --bin prism --bin prismctl
    python3 bench/run.py --events 1000000 --events 10000000

For each size it generates the same events (prismctl gen, fixed seed) as an Arrow file for the
peers and as Segment batches for Optiprism; measures HTTP ingestion with batches of 1,000 (and of
100 on up to 1M events) with durability on; loads the file into DuckDB (native table) and chDB
(MergeTree ordered by event and time); runs each trends query on all three in the same run,
checks that the answers agree, and writes bench/results.json and docs/benchmarks.md.
"""

import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time
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
             "--flight", self.flight, "--write-key", WRITE_KEY, "--api-token", TOKEN, "--log", "warn"],
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
    repository's cluster.toml describes, on free ports."""

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
             "--api-token", TOKEN, "--log", "warn"], stdout=self.log, stderr=self.log) for i in (1, 2, 3)]
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


def bench_cluster(events, seed, workdir, single_rate):
    """Ingestion into a three-member cluster through member 2 (leaders are spread over the members,
    so about two thirds of each batch is forwarded): full speed, then paced at half of that for
    acknowledgement latency."""
    cluster = Cluster(workdir)
    try:
        class Target:
            http = cluster.http[1]
        print(f"[cluster] ingesting {events:,} events in batches of 1,000 into 3 members (replication factor 3)", flush=True)
        full = ingest(Target, events, seed, 1000, 16)
        half = full["events_per_second"] / 2
        print(f"[cluster] {full['events_per_second']:,.0f} events/s; now paced at {half:,.0f} events/s", flush=True)
        paced = ingest(Target, min(events, 1_000_000), seed + 1, 1000, 16, rate=half)
        return {"members": 3, "replication_factor": 3, "full": full, "half_load": paced,
                "single_node_events_per_second": single_rate}
    finally:
        cluster.stop()


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
        cluster = Cluster(base, extra=extra)
        try:
            class Target:
                http = cluster.http[1]
            r = ingest(Target, events, seed + 2, 1000, 16, rate=rate)
            print(f"[cluster] {name}: p50 {r['latency_ms_p50']:.1f} ms, p99 {r['latency_ms_p99']:.1f} ms", flush=True)
            out.append({"variant": name, **r})
        finally:
            cluster.stop()
            if root:
                shutil.rmtree(base, ignore_errors=True)
    return out


def gen_args(events, seed):
    return ["--events", str(events), "--seed", str(seed), "--days", "90", "--start", "2024-01-01"]


def ingest(node, events, seed, batch, concurrency, rate=None):
    pace = ["--rate", str(rate)] if rate else []
    out = subprocess.check_output(
        [binary("prismctl"), "gen", *gen_args(events, seed), "--target", node.http, "--write-key", WRITE_KEY,
         "--batch-size", str(batch), "--concurrency", str(concurrency), "--json", *pace], stderr=subprocess.DEVNULL)
    return json.loads(out.decode().strip().splitlines()[-1])


# Each query: our JSON, and the same question in DuckDB and ClickHouse SQL. Every query returns
# per-bucket values plus the range total (ROLLUP), as ours does.
def queries():
    """The peers' SQL groups by the truncated instant and formats only the result rows, the
    fastest form we found for each engine (formatting every row as text first is much slower)."""
    rng = {"from": "2024-01-01", "to": "2024-03-30"}
    utc_range_duck = "\"timestamp\" >= TIMESTAMPTZ '2024-01-01 00:00:00+00' AND \"timestamp\" < TIMESTAMPTZ '2024-03-31 00:00:00+00'"
    utc_range_ch = "timestamp >= toDateTime64('2024-01-01 00:00:00', 3, 'UTC') AND timestamp < toDateTime64('2024-03-31 00:00:00', 3, 'UTC')"

    def duck_daily(agg, where, tz="UTC"):
        return (f"SELECT strftime(d, '%Y-%m-%d') AS b, v FROM (SELECT date_trunc('day', timezone('{tz}', \"timestamp\")) AS d,"
                f" {agg} AS v FROM events WHERE {where} GROUP BY ROLLUP (d))")

    def ch_daily(agg, where, tz="UTC"):
        return (f"SELECT toString(d) AS b, v FROM (SELECT toDate(timestamp, '{tz}') AS d, {agg} AS v FROM events"
                f" WHERE {where} GROUP BY d WITH ROLLUP) SETTINGS group_by_use_nulls = 1")

    ny_duck = "\"timestamp\" >= TIMESTAMPTZ '2024-01-01 05:00:00+00' AND \"timestamp\" < TIMESTAMPTZ '2024-03-31 04:00:00+00'"
    ny_ch = "timestamp >= toDateTime64('2024-01-01 05:00:00', 3, 'UTC') AND timestamp < toDateTime64('2024-03-31 04:00:00', 3, 'UTC')"
    week_duck = "\"timestamp\" >= TIMESTAMPTZ '2024-02-05 00:00:00+00' AND \"timestamp\" < TIMESTAMPTZ '2024-02-12 00:00:00+00'"
    week_ch = "timestamp >= toDateTime64('2024-02-05 00:00:00', 3, 'UTC') AND timestamp < toDateTime64('2024-02-12 00:00:00', 3, 'UTC')"
    return [
        {
            "name": "daily total (pageview)",
            "ours": {"kind": "trends", "date_range": rng, "interval": "day", "series": [{"event": "pageview", "math": "total"}]},
            "duckdb": duck_daily("count(*)", f"event = 'pageview' AND {utc_range_duck}"),
            "clickhouse": ch_daily("count()", f"event = 'pageview' AND {utc_range_ch}"),
        },
        {
            "name": "daily unique users (pageview)",
            "ours": {"kind": "trends", "date_range": rng, "interval": "day", "series": [{"event": "pageview", "math": "unique_users"}]},
            "duckdb": duck_daily("count(DISTINCT distinct_id)", f"event = 'pageview' AND {utc_range_duck}"),
            "clickhouse": ch_daily("uniqExact(distinct_id)", f"event = 'pageview' AND {utc_range_ch}"),
        },
        {
            "name": "daily total, New York time, filtered (click, $browser = Chrome)",
            "ours": {"kind": "trends", "timezone": "America/New_York", "date_range": rng, "interval": "day",
                     "series": [{"event": "click", "math": "total", "filters": [{"key": "$browser", "op": "eq", "value": "Chrome"}]}]},
            "duckdb": duck_daily("count(*)", f"event = 'click' AND \"$browser\" = 'Chrome' AND {ny_duck}", "America/New_York"),
            "clickhouse": ch_daily("count()", f"event = 'click' AND `$browser` = 'Chrome' AND {ny_ch}", "America/New_York"),
        },
        {
            "name": "unique users by $browser (all events)",
            "ours": {"kind": "trends", "date_range": rng, "interval": "month", "series": [{"math": "unique_users"}],
                     "breakdown": {"property": "$browser", "limit": 25}},
            "duckdb": f"""SELECT coalesce("$browser", '(none)') AS b, count(DISTINCT distinct_id) AS v FROM events
                         WHERE {utc_range_duck} GROUP BY ROLLUP (b)""",
            "clickhouse": f"""SELECT ifNull(`$browser`, '(none)') AS b, uniqExact(distinct_id) AS v FROM events
                             WHERE {utc_range_ch} GROUP BY b WITH ROLLUP SETTINGS group_by_use_nulls = 1""",
            "by_breakdown": True,
        },
        {
            "name": "hourly total, one week (all events)",
            "ours": {"kind": "trends", "date_range": {"from": "2024-02-05", "to": "2024-02-11"}, "interval": "hour",
                     "series": [{"math": "total"}]},
            "duckdb": f"""SELECT strftime(h, '%Y-%m-%dT%H:00:00+00:00') AS b, v FROM (SELECT date_trunc('hour', timezone('UTC', "timestamp")) AS h,
                         count(*) AS v FROM events WHERE {week_duck} GROUP BY ROLLUP (h))""",
            "clickhouse": f"""SELECT formatDateTime(h, '%Y-%m-%dT%H:00:00+00:00', 'UTC') AS b, v FROM (SELECT toStartOfHour(timestamp, 'UTC') AS h,
                             count() AS v FROM events WHERE {week_ch} GROUP BY h WITH ROLLUP) SETTINGS group_by_use_nulls = 1""",
        },
    ]


def ours_answer(client, options, q, by_breakdown):
    import pyarrow.flight as fl
    t = client.do_get(fl.Ticket(json.dumps(q).encode()), options).read_all().to_pylist()
    out = {}
    for r in t:
        if by_breakdown:
            if r["breakdown"] is not None and r["bucket"] is None:
                out[r["breakdown"]] = r["value"]
            elif r["breakdown"] is None and r["bucket"] is None:
                out[None] = r["value"]
        elif r["breakdown"] is None:
            if r["bucket"] is None:
                out[None] = r["value"]
            elif r["value"]:
                out[r["bucket"]] = r["value"]
    return out


def rows_answer(rows):
    return {b: float(v) for b, v in rows if v}


def timed(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_size(events, seed, runs, workdir):
    import duckdb, chdb.session, pyarrow.feather, pyarrow.parquet, pyarrow.flight as fl
    result = {"events": events}
    arrow_path = workdir / f"events-{events}.arrow"
    print(f"[{events:,}] generating the Arrow file for the peers", flush=True)
    subprocess.check_call([binary("prismctl"), "gen", *gen_args(events, seed), "--out", str(arrow_path)], stderr=subprocess.DEVNULL)
    table = pyarrow.feather.read_table(str(arrow_path))

    # Ingestion, batches of 100 (on at most 1M events) on a node of its own.
    small = min(events, 1_000_000)
    data = workdir / f"prism-{events}-b100" / "data"
    data.parent.mkdir(parents=True, exist_ok=True)
    node = Node(data)
    print(f"[{events:,}] ingesting {small:,} events in batches of 100", flush=True)
    result["ingest_batch_100"] = ingest(node, small, seed, 100, 32)
    node.stop()
    shutil.rmtree(data.parent, ignore_errors=True)

    data = workdir / f"prism-{events}" / "data"
    data.parent.mkdir(parents=True, exist_ok=True)
    node = Node(data)
    print(f"[{events:,}] ingesting {events:,} events in batches of 1,000", flush=True)
    result["ingest_batch_1000"] = ingest(node, events, seed, 1000, 16)
    print(f"[{events:,}] ingestion: {result['ingest_batch_1000']['events_per_second']:,.0f} events/s (batches of 1,000)", flush=True)

    duck = duckdb.connect()
    duck.execute("SET TimeZone = 'UTC'")
    duck.register("arrow_events", table)
    duck.execute("CREATE TABLE events AS SELECT * FROM arrow_events")
    duck.unregister("arrow_events")

    parquet_path = workdir / f"events-{events}.parquet"
    pyarrow.parquet.write_table(table, str(parquet_path))
    ch = chdb.session.Session(str(workdir / f"chdb-{events}"))
    ch.query("DROP TABLE IF EXISTS events")
    ch.query("""CREATE TABLE events (uuid String, event LowCardinality(String), timestamp DateTime64(3, 'UTC'),
                distinct_id String, `$session_id` Nullable(String), `$browser` LowCardinality(Nullable(String)),
                `$os` LowCardinality(Nullable(String)), country LowCardinality(Nullable(String)),
                plan LowCardinality(Nullable(String)), `$current_url` Nullable(String), search_term Nullable(String),
                price Nullable(Float64), duration_ms Nullable(Float64), is_mobile Nullable(Bool))
                ENGINE = MergeTree ORDER BY (event, timestamp)""")
    ch.query(f"INSERT INTO events SELECT * FROM file('{parquet_path}', Parquet)")
    del table

    client = fl.FlightClient("grpc://" + node.flight)
    options = fl.FlightCallOptions(headers=[(b"authorization", ("Bearer " + TOKEN).encode())])
    result["queries"] = []
    for q in queries():
        by_b = q.get("by_breakdown", False)
        ours_t, ours = timed(lambda: ours_answer(client, options, q["ours"], by_b), runs)
        duck_t, duck_rows = timed(lambda: duck.execute(q["duckdb"]).fetchall(), runs)
        ch_t, ch_rows = timed(lambda: [tuple(r.split("\t")) for r in str(ch.query(q["clickhouse"], "TSV")).strip().splitlines()], runs)
        duck_a = rows_answer(duck_rows)
        ch_a = {(None if b in ("", "\\N") else b): float(v) for b, v in ch_rows if float(v)}
        agree = ours == duck_a == ch_a
        if not agree:
            diff = {k: (ours.get(k), duck_a.get(k), ch_a.get(k)) for k in set(ours) | set(duck_a) | set(ch_a)
                    if not (ours.get(k) == duck_a.get(k) == ch_a.get(k))}
            print(f"  answers differ for {q['name']}: {dict(list(diff.items())[:5])}", flush=True)
        best = min(duck_t, ch_t)
        row = {"name": q["name"], "optiprism_s": ours_t, "duckdb_s": duck_t, "chdb_s": ch_t,
               "ratio_to_best_peer": ours_t / best, "answers_agree": agree}
        print(f"  {q['name']}: optiprism {ours_t*1000:.1f} ms, duckdb {duck_t*1000:.1f} ms, chdb {ch_t*1000:.1f} ms,"
              f" ratio {ours_t/best:.2f}, agree={agree}", flush=True)
        result["queries"].append(row)
    node.stop()
    shutil.rmtree(data.parent, ignore_errors=True)
    shutil.rmtree(workdir / f"chdb-{events}", ignore_errors=True)
    arrow_path.unlink(missing_ok=True)
    parquet_path.unlink(missing_ok=True)
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
        "(`bench/run.py` installs DuckDB and chDB from PyPI into its own venv). Everything runs on the",
        f"same machine in the same run: {m['cpus']} cores ({m['cpu']}), DuckDB {m['duckdb']}, chDB {m['chdb']}.",
        "Data: `prismctl gen` with seed 42 (power-law activity, ~50 event types, 90 days, sessions, typed",
        "properties). Optiprism: one node (`prism up`, 8 partitions, replication factor 1), queried over",
        "Arrow Flight with the JSON query as ticket (end-to-end time including the network round trip);",
        "DuckDB: an in-memory native table; chDB: a MergeTree table ordered by (event, timestamp). Every peer",
        "computes the same per-bucket values and the range total (`ROLLUP`), and the answers are",
        "cross-checked. Times are medians of several runs after a warm-up.",
        "",
        "## Ingestion (HTTP, Segment batches, durable: acknowledged after commit and flush)",
        "",
        "| events | batch size | clients in flight | events/s | ack latency p50 | p99 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["sizes"]:
        for key in ("ingest_batch_100", "ingest_batch_1000"):
            i = r[key]
            lines.append(f"| {i['events']:,} | {i['batch_size']:,} | {i['concurrency']} | {i['events_per_second']:,.0f} |"
                         f" {i['latency_ms_p50']:.1f} ms | {i['latency_ms_p99']:.1f} ms |")
    c = results.get("cluster")
    if c:
        full, half = c["full"], c["half_load"]
        share = full["events_per_second"] / c["single_node_events_per_second"]
        lines += ["", "## Ingestion into a three-node cluster (replication factor 3, same machine)", "",
                  "Three `prism node` members on 127.0.0.1–3 share the two cores with the load generator; every",
                  "partition is replicated on all three, and an event is acknowledged once a majority flushed it.",
                  "The generator sends to member 2; partition leaders start spread over the members, so member 2",
                  "forwards the events of the partitions it does not lead to their leaders over QUIC.", "",
                  "| load | events | events/s | share of one node | ack latency p50 | p99 |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| full speed, 16 clients | {full['events']:,} | {full['events_per_second']:,.0f} | {share:.0%} |"
                  f" {full['latency_ms_p50']:.1f} ms | {full['latency_ms_p99']:.1f} ms |",
                  f"| paced at half of that | {half['events']:,} | {half['events_per_second']:,.0f} | |"
                  f" {half['latency_ms_p50']:.1f} ms | {half['latency_ms_p99']:.1f} ms |"]
        variants = c.get("latency_variants")
        if variants:
            lines += ["", "Where the tail at half load comes from (`--cluster-latency`: the same paced run, 600,000",
                      "events, with one cause taken away at a time):", "",
                      "| variant | events/s | ack latency p50 | p99 |", "|---|---:|---:|---:|"]
            for v in variants:
                lines.append(f"| {v['variant']} | {v['events_per_second']:,.0f} | {v['latency_ms_p50']:.1f} ms |"
                             f" {v['latency_ms_p99']:.1f} ms |")
    lines += ["", "## Trends queries", ""]
    for r in results["sizes"]:
        lines += [f"### {r['events']:,} events", "",
                  "| query | Optiprism | DuckDB | chDB | Optiprism / best peer | answers agree |",
                  "|---|---:|---:|---:|---:|---|"]
        for q in r["queries"]:
            lines.append(f"| {q['name']} | {q['optiprism_s']*1000:.1f} ms | {q['duckdb_s']*1000:.1f} ms | {q['chdb_s']*1000:.1f} ms |"
                         f" {q['ratio_to_best_peer']:.2f} | {'yes' if q['answers_agree'] else 'NO'} |")
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + results["notes"] + [""]
    (ROOT / "docs/benchmarks.md").write_text("\n".join(lines))


def main():
    ensure_venv()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, action="append", help="event count (repeatable)")
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
        single = results["sizes"][0]["ingest_batch_1000"]["events_per_second"]
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="optiprism-bench-"))
        results["cluster"] = bench_cluster(results["sizes"][0]["events"], args.seed, workdir, single)
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
    sizes = args.events or [1_000_000]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="optiprism-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "sizes": []}
    if notes_path.exists():
        results["notes"] = notes_path.read_text().strip().splitlines()
    for n in sizes:
        results["sizes"].append(bench_size(n, args.seed, args.runs, workdir))
        (ROOT / "bench/results.json").write_text(json.dumps(results, indent=2))
        write_markdown(results)
    single = results["sizes"][0]["ingest_batch_1000"]["events_per_second"]
    results["cluster"] = bench_cluster(sizes[0], args.seed, workdir, single)
    (ROOT / "bench/results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results)
    print("wrote bench/results.json and docs/benchmarks.md")


if __name__ == "__main__":
    main()
