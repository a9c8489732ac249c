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

/// What failed on a member until it restarts, as its status reports it: groups an error
/// stopped (`group: error`).
fn failed_groups(status: &Value) -> Vec<String> {
    groups_with(status, "failed", "")
}

/// The partitions a member cannot seal (`group: sealing failed: …`): it retries on its own and
/// resumes once the cause (a full disk, say) is gone, with no restart.
fn unsealable_groups(status: &Value) -> Vec<String> {
    groups_with(status, "seal_failed", "sealing failed: ")
}

/// `group: {prefix}{error}` for each group whose status has an error under `field`.
fn groups_with(status: &Value, field: &str, prefix: &str) -> Vec<String> {
    let groups = status["groups"].as_array().into_iter().flatten();
    groups
        .filter_map(|g| {
            let name = g["group"].as_str().unwrap_or("?");
            g[field].as_str().map(|e| format!("{name}: {prefix}{e}"))
        })
        .collect()
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
                                "ready": s["ready"], "draining": s["draining"], "leads": leads(&view, m.id),
                                "failed": failed_groups(s), "cannot_seal": unsealable_groups(s)}),
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
                Ok(s) if !failed_groups(s).is_empty() => "failed (restart it)".to_string(),
                Ok(s) if !unsealable_groups(s).is_empty() => "cannot seal (retrying)".to_string(),
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
        let failed = m.status.as_ref().map(failed_groups).unwrap_or_default();
        let unsealable = m.status.as_ref().map(unsealable_groups).unwrap_or_default();
        if !unsealable.is_empty() {
            out.push(format!(
                "node {} cannot seal chunks and retries on its own; it resumes once the cause is fixed ({})",
                m.id,
                unsealable.join("; ")
            ));
        }
        match &m.status {
            Err(e) => out.push(format!("node {} is unreachable: {e}", m.id)),
            Ok(_) if !failed.is_empty() => out.push(format!(
                "node {} failed and needs a restart once the cause is fixed ({})",
                m.id,
                failed.join("; ")
            )),
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

/// The HTTP URL of the node leading `group`, from the view.
fn leader_url(view: &ClusterView, group: &str) -> anyhow::Result<(u64, String)> {
    let g = view
        .groups
        .iter()
        .find(|g| g.name == group)
        .with_context(|| format!("no {group} in the cluster"))?;
    let leader = g
        .leader
        .with_context(|| format!("{group} has no leader right now; try again shortly"))?;
    let member = view
        .member(leader)
        .with_context(|| format!("{group}'s leader, node {leader}, is not a listed member"))?;
    Ok((leader, member.http.clone()))
}

/// `partitions move`: one replica of a partition from one node to another, run by the
/// partition's leader.
pub(crate) async fn move_replica(
    endpoints: &Endpoints,
    partition: u32,
    from: u64,
    to: u64,
    output: Output,
) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    let (_, url) = leader_url(&view, &format!("partition-{partition}"))?;
    let answer = endpoints
        .post(
            &url,
            "/admin/v1/partitions/move",
            &json!({"partition": partition, "from": from, "to": to}),
        )
        .await?;
    match output {
        Output::Json => println!("{answer}"),
        Output::Table => {
            println!("partition-{partition}: replica moved from node {from} to node {to}")
        }
    }
    Ok(())
}

/// Replica moves that even out how many partitions each member holds: a partition of the
/// member holding most moves to the member holding fewest (not already a replica of it), while
/// they differ by two or more.
fn replica_plan(view: &ClusterView, exclude: Option<u64>) -> Vec<(u32, u64, u64)> {
    let mut count: BTreeMap<u64, usize> = view
        .members
        .iter()
        .filter(|m| m.status.is_ok() && Some(m.id) != exclude)
        .map(|m| (m.id, 0))
        .collect();
    let mut replicas: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for g in &view.groups {
        if let Some(p) = g
            .name
            .strip_prefix("partition-")
            .and_then(|p| p.parse().ok())
        {
            for v in &g.voters {
                if let Some(c) = count.get_mut(v) {
                    *c += 1;
                }
            }
            replicas.insert(p, g.voters.clone());
        }
    }
    let mut plan = Vec::new();
    // A member being decommissioned gives every replica away first.
    if let Some(leaving) = exclude {
        for (p, voters) in replicas.iter_mut() {
            if !voters.contains(&leaving) {
                continue;
            }
            let target = count
                .iter()
                .filter(|(m, _)| !voters.contains(m))
                .min_by_key(|(_, c)| **c)
                .map(|(m, _)| *m);
            if let Some(to) = target {
                *count.get_mut(&to).expect("counted") += 1;
                voters.retain(|&v| v != leaving);
                voters.push(to);
                plan.push((*p, leaving, to));
            }
        }
    }
    loop {
        let Some((&most, &high)) = count.iter().max_by_key(|(_, c)| **c) else {
            return plan;
        };
        let Some((&least, &low)) = count.iter().min_by_key(|(_, c)| **c) else {
            return plan;
        };
        if high < low + 2 {
            return plan;
        }
        let Some((&p, voters)) = replicas
            .iter_mut()
            .find(|(_, v)| v.contains(&most) && !v.contains(&least))
        else {
            return plan;
        };
        voters.retain(|&v| v != most);
        voters.push(least);
        *count.get_mut(&most).expect("counted") -= 1;
        *count.get_mut(&least).expect("counted") += 1;
        plan.push((p, most, least));
    }
}

/// Runs replica moves one after another, each through the partition's current leader.
async fn run_moves(
    endpoints: &Endpoints,
    plan: &[(u32, u64, u64)],
    output: Output,
) -> anyhow::Result<()> {
    for (i, (p, from, to)) in plan.iter().enumerate() {
        if output == Output::Table {
            println!(
                "[{}/{}] moving partition-{p} from node {from} to node {to}",
                i + 1,
                plan.len()
            );
        }
        let view = ClusterView::gather(endpoints).await?;
        let (_, url) = leader_url(&view, &format!("partition-{p}"))?;
        endpoints
            .post(
                &url,
                "/admin/v1/partitions/move",
                &json!({"partition": p, "from": from, "to": to}),
            )
            .await
            .with_context(|| format!("moving partition-{p} from node {from} to node {to}"))?;
    }
    Ok(())
}

/// `partitions balance --replicas`: even out replicas per member, then leaders.
pub(crate) async fn balance_replicas(
    endpoints: &Endpoints,
    output: Output,
    dry_run: bool,
) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    let plan = replica_plan(&view, None);
    if dry_run {
        print_moves(&plan, output);
        return Ok(());
    }
    run_moves(endpoints, &plan, output).await?;
    if output == Output::Table && plan.is_empty() {
        println!("replicas are already balanced");
    }
    // A group whose leader moved away elects another within a few election timeouts.
    for _ in 0..60 {
        let view = ClusterView::gather(endpoints).await?;
        if view.groups.iter().all(|g| g.leader.is_some()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    balance(endpoints, output, false).await
}

fn print_moves(plan: &[(u32, u64, u64)], output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            json!(
                plan.iter()
                    .map(|(p, from, to)| json!({"partition": p, "from": from, "to": to}))
                    .collect::<Vec<_>>()
            )
        ),
        Output::Table => print_table(
            &["PARTITION", "FROM", "TO"],
            plan.iter()
                .map(|(p, from, to)| vec![p.to_string(), from.to_string(), to.to_string()])
                .collect(),
        ),
    }
}

/// `node add`: the metadata group's leader adds the node (learner first, then voter).
pub(crate) async fn add_node(
    endpoints: &Endpoints,
    id: u64,
    raft: &str,
    http: &str,
    flight: &str,
    output: Output,
) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    let (_, url) = leader_url(&view, "metadata")?;
    let answer = endpoints
        .post(
            &url,
            "/admin/v1/nodes",
            &json!({"id": id, "raft": raft, "http": http, "flight": flight}),
        )
        .await?;
    match output {
        Output::Json => println!("{answer}"),
        Output::Table => println!(
            "node {id} is a member; `prismctl partitions balance --replicas` moves replicas to it"
        ),
    }
    Ok(())
}

/// `node remove`: the metadata group's leader removes a node that holds no replicas.
pub(crate) async fn remove_node(
    endpoints: &Endpoints,
    id: u64,
    output: Output,
) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    let (_, url) = leader_url(&view, "metadata")?;
    let answer = endpoints
        .post(&url, "/admin/v1/nodes/remove", &json!({"id": id}))
        .await?;
    match output {
        Output::Json => println!("{answer}"),
        Output::Table => println!("node {id} is no longer a member; it can be stopped"),
    }
    Ok(())
}

/// `node drain`: the node stops being ready and hands its leaderships to other voters.
pub(crate) async fn drain(
    endpoints: &Endpoints,
    id: u64,
    undo: bool,
    output: Output,
) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    let member = view
        .member(id)
        .with_context(|| format!("node {id} is not a member"))?;
    let answer = endpoints
        .post(&member.http, "/admin/v1/drain", &json!({"draining": !undo}))
        .await?;
    let failed: Vec<String> = answer["transfers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some(format!(
                "{}: {}",
                t["group"].as_str()?,
                t["error"].as_str()?
            ))
        })
        .collect();
    match output {
        Output::Json => println!("{answer}"),
        Output::Table if undo => println!("node {id} takes traffic again"),
        Output::Table => println!(
            "node {id} is drained: not ready, {} leaderships handed over",
            answer["transfers"].as_array().map_or(0, Vec::len) - failed.len()
        ),
    }
    if !failed.is_empty() {
        bail!(
            "some leaderships stayed on node {id}: {}",
            failed.join("; ")
        );
    }
    Ok(())
}

/// `node decommission`: moves every replica off the node, hands over its metadata leadership,
/// then removes it from the cluster. Safe to run again after an interruption.
pub(crate) async fn decommission(
    endpoints: &Endpoints,
    id: u64,
    output: Output,
) -> anyhow::Result<()> {
    let view = ClusterView::gather(endpoints).await?;
    if view.member(id).is_none() {
        bail!("node {id} is not a member");
    }
    let plan = replica_plan(&view, Some(id));
    let leaving: Vec<&str> = view
        .groups
        .iter()
        .filter(|g| g.name.starts_with("partition-") && g.voters.contains(&id))
        .map(|g| g.name.as_str())
        .collect();
    if plan.iter().filter(|(_, from, _)| *from == id).count() < leaving.len() {
        bail!(
            "node {id} holds replicas no other member can take (each partition needs its replication factor of distinct members): add a node first"
        );
    }
    run_moves(endpoints, &plan, output).await?;
    let view = ClusterView::gather(endpoints).await?;
    let (leader, _) = leader_url(&view, "metadata")?;
    if leader == id {
        let to = view
            .members
            .iter()
            .find(|m| m.id != id && m.status.is_ok())
            .map(|m| m.id)
            .context("no other member to lead the metadata group")?;
        transfer(endpoints, "metadata", to, output).await?;
    }
    remove_node(endpoints, id, output).await
}
