//! `prismctl cluster …`, `partitions …` and `leader …`: the cluster's state and its leaders.

use crate::admin::{ClusterView, Endpoints, GroupView};
use crate::output::{Output, print_table};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Replication lag (entries) above which `cluster health` calls a replica behind.
const LAG_UNHEALTHY: u64 = 1_000;

/// Exit code of `cluster health` when the cluster answers but is not healthy.
pub(crate) const EXIT_UNHEALTHY: u8 = 3;

fn replicas(g: &GroupView) -> String {
    let mut s: Vec<String> = g.voters.iter().map(u64::to_string).collect();
    s.extend(g.learners.iter().map(|l| format!("{l}(learner)")));
    s.join(",")
}

fn applied(g: &GroupView) -> String {
    g.applied
        .iter()
        .map(|(id, a)| format!("{id}:{a}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn max_lag(g: &GroupView) -> Option<u64> {
    g.lag.values().copied().max()
}

fn group_json(g: &GroupView) -> Value {
    json!({
        "group": g.name,
        "leader": g.leader,
        "voters": g.voters,
        "learners": g.learners,
        "applied": g.applied.iter().map(|(id, a)| (id.to_string(), json!(a))).collect::<serde_json::Map<_, _>>(),
        "lag": g.lag.iter().map(|(id, a)| (id.to_string(), json!(a))).collect::<serde_json::Map<_, _>>(),
    })
}

fn print_groups(view: &ClusterView) {
    let rows = view
        .groups
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.leader.map_or("none".into(), |l| l.to_string()),
                replicas(g),
                applied(g),
                max_lag(g).map_or("?".into(), |l| l.to_string()),
            ]
        })
        .collect();
    print_table(&["GROUP", "LEADER", "REPLICAS", "APPLIED", "LAG"], rows);
}

fn leads(view: &ClusterView, id: u64) -> usize {
    view.groups.iter().filter(|g| g.leader == Some(id)).count()
}

/// `cluster status`: members, then groups.
pub(crate) async fn status(endpoints: &Endpoints, output: Output) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    if output == Output::Json {
        let members: Vec<Value> = view
            .members
            .iter()
            .map(|m| match &m.status {
                Ok(s) => json!({"id": m.id, "http": m.http, "flight": m.flight, "reachable": true,
                                "ready": s["ready"], "draining": s["draining"], "leads": leads(&view, m.id)}),
                Err(e) => json!({"id": m.id, "http": m.http, "flight": m.flight, "reachable": false, "error": e}),
            })
            .collect();
        let groups: Vec<Value> = view.groups.iter().map(group_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"members": members, "groups": groups}))?
        );
        return Ok(());
    }
    let rows = view
        .members
        .iter()
        .map(|m| {
            let state = match &m.status {
                Ok(s) if s["draining"].as_bool() == Some(true) => "draining".to_string(),
                Ok(s) if s["ready"].as_bool() == Some(true) => "ready".to_string(),
                Ok(_) => "not ready".to_string(),
                Err(e) => format!("unreachable: {e}"),
            };
            vec![
                m.id.to_string(),
                m.http.clone(),
                m.flight.clone(),
                state,
                leads(&view, m.id).to_string(),
            ]
        })
        .collect();
    print_table(&["NODE", "HTTP", "FLIGHT", "STATE", "LEADS"], rows);
    println!();
    print_groups(&view);
    Ok(())
}

/// What is wrong with the cluster, one line each; empty when healthy.
fn problems(view: &ClusterView) -> Vec<String> {
    let mut out = Vec::new();
    for m in &view.members {
        match &m.status {
            Err(e) => out.push(format!("node {} is unreachable: {e}", m.id)),
            Ok(s) if s["draining"].as_bool() == Some(true) => {
                out.push(format!("node {} is draining", m.id))
            }
            Ok(s) if s["ready"].as_bool() != Some(true) => {
                out.push(format!("node {} is not ready", m.id))
            }
            Ok(_) => {}
        }
    }
    for g in &view.groups {
        match g.leader {
            None => out.push(format!("{} has no leader", g.name)),
            Some(_) => {
                for (id, lag) in &g.lag {
                    if *lag > LAG_UNHEALTHY {
                        out.push(format!("{}: node {id} is {lag} entries behind", g.name));
                    }
                }
            }
        }
    }
    out
}

/// `cluster health`: exit 0 when healthy, [`EXIT_UNHEALTHY`] with the reasons when not.
pub(crate) async fn health(endpoints: &Endpoints, output: Output) -> anyhow::Result<u8> {
    let view = ClusterView::gather(endpoints).await?;
    let problems = problems(&view);
    let healthy = problems.is_empty();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"healthy": healthy, "problems": problems}))?
        ),
        Output::Table if healthy => println!(
            "healthy: {} nodes ready, {} groups with a leader",
            view.members.len(),
            view.groups.len()
        ),
        Output::Table => {
            println!("unhealthy:");
            for p in &problems {
                println!("  {p}");
            }
        }
    }
    Ok(if healthy { 0 } else { EXIT_UNHEALTHY })
}

/// `partitions list`.
pub(crate) async fn list(endpoints: &Endpoints, output: Output) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&view.groups.iter().map(group_json).collect::<Vec<_>>())?
        ),
        Output::Table => print_groups(&view),
    }
    Ok(())
}

/// The group named on the command line: `metadata`, `partition-3` or `3`.
pub(crate) fn group_body(group: &str) -> anyhow::Result<Value> {
    if group == "metadata" || group.starts_with("partition-") {
        return Ok(json!({ "group": group }));
    }
    let p: u32 = group.parse().with_context(|| {
        format!("`{group}` is not a partition number, `partition-<n>` or `metadata`")
    })?;
    Ok(json!({ "partition": p }))
}

/// `leader transfer`.
pub(crate) async fn transfer(
    endpoints: &Endpoints,
    group: &str,
    to: u64,
    output: Output,
) -> anyhow::Result<()> {
    let mut body = group_body(group)?;
    body["to"] = json!(to);
    let (url, _) = endpoints.first_status().await?;
    let answer = endpoints
        .post(&url, "/admin/v1/leader-transfer", &body)
        .await?;
    match output {
        Output::Json => println!("{answer}"),
        Output::Table => println!(
            "{} is led by node {}",
            answer["group"].as_str().unwrap_or(group),
            to
        ),
    }
    Ok(())
}

/// Transfers that even out how many groups each member leads: a group moves from its leader
/// to the voter of the group that leads fewest, as long as that voter leads at least two fewer
/// (each move then narrows the spread), busiest leader first.
fn balance_plan(view: &ClusterView) -> Vec<(String, u64, u64)> {
    let mut count: BTreeMap<u64, usize> = view
        .members
        .iter()
        .filter(|m| m.status.is_ok())
        .map(|m| (m.id, 0))
        .collect();
    let mut leaders: BTreeMap<&str, u64> = BTreeMap::new();
    for g in &view.groups {
        if let Some(l) = g.leader.filter(|l| count.contains_key(l)) {
            *count.get_mut(&l).expect("counted") += 1;
            leaders.insert(&g.name, l);
        }
    }
    let mut plan = Vec::new();
    loop {
        let best = view
            .groups
            .iter()
            .filter_map(|g| {
                let from = *leaders.get(g.name.as_str())?;
                let (to_count, to) = g
                    .voters
                    .iter()
                    .filter(|v| **v != from)
                    .filter_map(|v| Some((*count.get(v)?, *v)))
                    .min()?;
                (to_count + 2 <= count[&from]).then_some((count[&from], g, from, to))
            })
            .max_by_key(|(from_count, ..)| *from_count);
        let Some((_, g, from, to)) = best else {
            return plan;
        };
        *count.get_mut(&from).expect("counted") -= 1;
        *count.get_mut(&to).expect("counted") += 1;
        leaders.insert(&g.name, to);
        plan.push((g.name.clone(), from, to));
    }
}

/// `partitions balance`: spreads leaders evenly over the members (each transfer pauses writes
/// to its group for about one election timeout; transfers of different groups run at once).
pub(crate) async fn balance(
    endpoints: &Endpoints,
    output: Output,
    dry_run: bool,
) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    let plan = balance_plan(&view);
    if dry_run || plan.is_empty() {
        match output {
            Output::Json => println!(
                "{}",
                json!(
                    plan.iter()
                        .map(|(g, from, to)| json!({"group": g, "from": from, "to": to}))
                        .collect::<Vec<_>>()
                )
            ),
            Output::Table if plan.is_empty() => println!("leaders are already balanced"),
            Output::Table => print_table(
                &["GROUP", "FROM", "TO"],
                plan.iter()
                    .map(|(g, from, to)| vec![g.clone(), from.to_string(), to.to_string()])
                    .collect(),
            ),
        }
        return Ok(());
    }
    let view = &view;
    let results = futures::future::join_all(plan.iter().map(|(group, from, to)| async move {
        // Asked of the current leader, which runs the transfer.
        let url = view
            .member(*from)
            .map(|m| m.http.clone())
            .unwrap_or_else(|| endpoints.urls[0].clone());
        let body = json!({"group": group, "to": to});
        endpoints
            .post(&url, "/admin/v1/leader-transfer", &body)
            .await
    }))
    .await;
    let mut failed = 0;
    let mut rows = Vec::new();
    for ((group, from, to), result) in plan.iter().zip(&results) {
        let outcome = match result {
            Ok(_) => "moved".to_string(),
            Err(e) => {
                failed += 1;
                format!("failed: {e:#}")
            }
        };
        rows.push(vec![
            group.clone(),
            from.to_string(),
            to.to_string(),
            outcome,
        ]);
    }
    match output {
        Output::Json => println!(
            "{}",
            json!(
                rows.iter()
                    .map(|r| json!({"group": r[0], "from": r[1], "to": r[2], "outcome": r[3]}))
                    .collect::<Vec<_>>()
            )
        ),
        Output::Table => print_table(&["GROUP", "FROM", "TO", "OUTCOME"], rows),
    }
    if failed > 0 {
        bail!("{failed} of {} transfers failed", plan.len());
    }
    Ok(())
}

/// `cluster init`: creates the cluster CA that nodes issue their certificates from.
pub(crate) fn init(ca_dir: &PathBuf) -> anyhow::Result<()> {
    use optiprism_consensus::tls::ClusterCa;
    if ca_dir.join("ca.key").exists() {
        bail!(
            "{} already holds a cluster CA; nodes issue their certificates from it",
            ca_dir.display()
        );
    }
    std::fs::create_dir_all(ca_dir)
        .with_context(|| format!("cannot create {}", ca_dir.display()))?;
    let ca = ClusterCa::generate("optiprism")?;
    ca.save(ca_dir)?;
    println!(
        "created the cluster CA in {}
start each node with `prism node --config cluster.toml --id <n>` (with `cluster.ca-dir` pointing here); on first start it issues its own certificate",
        ca_dir.display()
    );
    Ok(())
}
