//! The real SDKs users already have, pointed at a real node: `segment-analytics-python` and
//! `posthog` send events; pyarrow (Flight) and ADBC's Flight SQL driver read them back, with and
//! without prepared statements. Installed into a venv by the test set-up.

use optiprism_testkit::{API_TOKEN, TestNode, WRITE_KEY, run_python};
use serde_json::Value;

const SCRIPT: &str = r#"
import json, sys, datetime
http, flight, write_key, token = sys.argv[1:5]

# --- Segment's Python SDK ---
import segment.analytics as analytics
errors = []
analytics.write_key = write_key
analytics.host = http
analytics.on_error = lambda e, batch: errors.append(str(e))
analytics.sync_mode = True
ts = datetime.datetime(2024, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
analytics.track(anonymous_id="anon-1", event="pageview", properties={"path": "/pricing"}, timestamp=ts)
analytics.identify(user_id="user-1", anonymous_id="anon-1", traits={"email": "u1@example.com", "plan": "pro"}, timestamp=ts)
for i in range(5):
    analytics.track(user_id="user-1", event="Signed Up" if i == 0 else "pageview", properties={"i": i}, timestamp=ts)
analytics.flush()
assert not errors, errors

# --- PostHog's Python SDK ---
from posthog import Posthog
ph = Posthog(project_api_key=write_key, host=http, sync_mode=True, gzip=True)
for i in range(3):
    ph.capture(event="pageview", distinct_id="ph-user", properties={"price": 10 + i}, timestamp=ts)
ph.capture(event="$identify", distinct_id="ph-user", properties={"$anon_distinct_id": "ph-anon"}, timestamp=ts)
ph.capture(event="pageview", distinct_id="ph-anon", timestamp=ts)
ph.flush()
ph.shutdown()

# --- pyarrow: a JSON insight over a plain Flight DoGet ---
import pyarrow.flight as fl
client = fl.FlightClient("grpc://" + flight)
options = fl.FlightCallOptions(headers=[(b"authorization", ("Bearer " + token).encode())])
query = {"kind": "trends", "date_range": {"from": "2024-06-01", "to": "2024-06-01"},
         "series": [{"id": "views", "event": "pageview", "math": "total"},
                    {"id": "viewers", "event": "pageview", "math": "unique_users"}]}
table = client.do_get(fl.Ticket(json.dumps(query).encode()), options).read_all()
totals = {r["series"]: r["value"] for r in table.to_pylist() if r["bucket"] is None}

# --- ADBC Flight SQL ---
import adbc_driver_flightsql.dbapi as adbc
import warnings
warnings.simplefilter("ignore")
conn = adbc.connect("grpc://" + flight, db_kwargs={"adbc.flight.sql.authorization_header": "Bearer " + token})
cur = conn.cursor()
cur.execute("SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY event")   # prepared
by_event = {e: n for e, n in cur.fetchall()}
cur.execute("SELECT count(*) FROM events WHERE event = ?", parameters=("pageview",))  # prepared, bound
bound = cur.fetchone()[0]
stmt = cur.adbc_statement                                                              # not prepared
stmt.set_sql_query("SELECT count(DISTINCT person_id) AS persons FROM events")
reader, _ = stmt.execute_query()
import pyarrow
persons = pyarrow.RecordBatchReader._import_from_c(reader.address).read_all().column(0)[0].as_py()
cur.execute("SELECT properties FROM persons WHERE properties LIKE '%u1@example.com%'")
person_props = [json.loads(p) for (p,) in cur.fetchall()]
try:
    cur.execute("SELECT nope FROM events")
    bad_sql = None
except Exception as e:
    bad_sql = type(e).__name__ + ": " + str(e)
conn.close()
print(json.dumps({"totals": totals, "by_event": by_event, "bound": bound, "persons": persons,
                  "person_props": person_props, "bad_sql": bad_sql}))
"#;

#[test]
fn segment_and_posthog_sdks_in_pyarrow_and_adbc_out() {
    let node = TestNode::start();
    let out = run_python(SCRIPT, &[&node.http, &node.flight, WRITE_KEY, API_TOKEN])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", node.log()));
    let result: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    // 1 + 4 Segment page views, 3 + 1 PostHog ones.
    assert_eq!(result["totals"]["views"], 9.0, "{result}");
    // Viewers: user-1 (with anon-1 merged in) and ph-user (with ph-anon merged in).
    assert_eq!(result["totals"]["viewers"], 2.0, "{result}");
    assert_eq!(result["by_event"]["pageview"], 9, "{result}");
    assert_eq!(result["by_event"]["Signed Up"], 1, "{result}");
    assert_eq!(result["by_event"]["$identify"], 2, "{result}");
    assert_eq!(result["bound"], 9, "{result}");
    assert_eq!(result["persons"], 2, "{result}");
    assert_eq!(result["person_props"][0]["plan"], "pro", "{result}");
    let bad = result["bad_sql"].as_str().expect("bad SQL must fail");
    assert!(
        bad.contains("INVALID_ARGUMENT") || bad.contains("invalid"),
        "{bad}"
    );
}
