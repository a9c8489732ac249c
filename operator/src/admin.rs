//! Talking to the nodes' admin API, and putting their answers together into one view of the
//! cluster.
//!
//! Each node's `GET /admin/v1/status` describes only what that node sees; a group's truth is
//! split between its leader (last log, replication lag) and each replica (what it applied).
//! [`ClusterView::gather`] asks the first endpoint that answers for the members, then asks
//! every member, and keeps each answer (or why there was none).

use anyhow::{Context, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// How prismctl reaches the cluster.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    /// HTTP addresses of nodes to ask first (`http://` is added when missing).
    pub urls: Vec<String>,
    /// The admin token, if any.
    pub admin_token: Option<String>,
    client: reqwest::Client,
}

/// The URL of an HTTP address given with or without a scheme.
pub(crate) fn http_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", addr.trim_end_matches('/'))
    }
}

/// A failed admin request: the node's JSON error message when it sent one.
async fn failure(response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match body["error"]["message"].as_str() {
        Some(message) => anyhow::anyhow!("{message} (HTTP {})", status.as_u16()),
        None => anyhow::anyhow!("HTTP {status}"),
    }
}

impl Endpoints {
    /// Endpoints from a comma-separated list.
    pub(crate) fn new(list: &str, admin_token: Option<String>) -> anyhow::Result<Endpoints> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(http_url)
            .collect();
        if urls.is_empty() {
            bail!("--endpoints: no address given");
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(3))
            .build()?;
        Ok(Endpoints {
            urls,
            admin_token,
            client,
        })
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.admin_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `GET {url}/admin/v1/status`.
    pub(crate) async fn status(&self, url: &str) -> anyhow::Result<Value> {
        let response = self
            .authorized(self.client.get(format!("{url}/admin/v1/status")))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("{url} is unreachable"))?;
        if !response.status().is_success() {
            return Err(failure(response).await).with_context(|| url.to_string());
        }
        Ok(response.json().await?)
    }

    /// The status of the first endpoint that answers.
    pub(crate) async fn first_status(&self) -> anyhow::Result<(String, Value)> {
        let mut errors = Vec::new();
        for url in &self.urls {
            match self.status(url).await {
                Ok(status) => return Ok((url.clone(), status)),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("no endpoint answered: {}", errors.join("; "))
    }

    /// `POST {url}{path}` with a JSON body; the JSON answer.
    pub(crate) async fn post(&self, url: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .authorized(self.client.post(format!("{url}{path}")))
            .json(body)
            .send()
            .await
            .with_context(|| format!("{url} is unreachable"))?;
        if !response.status().is_success() {
            return Err(failure(response).await);
        }
        Ok(response.json().await?)
    }
}

/// One member as prismctl saw it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// Its id.
    pub id: u64,
    /// Its HTTP URL.
    pub http: String,
    /// Its Flight address.
    pub flight: String,
    /// Its status, or why it did not answer.
    pub status: Result<Value, String>,
}

/// One group put together from its replicas' answers.
#[derive(Debug, Clone)]
pub(crate) struct GroupView {
    /// `metadata` or `partition-<n>`.
    pub name: String,
    /// The leader, as the replicas that answered agree (the highest claim wins ties).
    pub leader: Option<u64>,
    /// Voting replicas.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Applied index per replica that answered.
    pub applied: BTreeMap<u64, u64>,
    /// Entries each replica is behind the leader's log, when the leader answered.
    pub lag: BTreeMap<u64, u64>,
}

/// The cluster as its members describe it.
#[derive(Debug, Clone)]
pub(crate) struct ClusterView {
    /// Every member, in id order.
    pub members: Vec<Member>,
    /// Every group, metadata first, then partitions in order.
    pub groups: Vec<GroupView>,
}

impl ClusterView {
    /// Asks the endpoints for the members, then every member for its status.
    pub(crate) async fn gather(endpoints: &Endpoints) -> anyhow::Result<ClusterView> {
        let (_, first) = endpoints.first_status().await?;
        let listed = first["members"].as_array().cloned().unwrap_or_default();
        let answers = futures_join(listed.iter().map(|m| {
            let http = http_url(m["http"].as_str().unwrap_or_default());
            async move { endpoints.status(&http).await.map_err(|e| format!("{e:#}")) }
        }))
        .await;
        let members: Vec<Member> = listed
            .iter()
            .zip(answers)
            .map(|(m, status)| Member {
                id: m["id"].as_u64().unwrap_or_default(),
                http: http_url(m["http"].as_str().unwrap_or_default()),
                flight: m["flight"].as_str().unwrap_or_default().to_string(),
                status,
            })
            .collect();
        Ok(ClusterView {
            groups: group_views(&members),
            members,
        })
    }

    /// The member with id `id`.
    pub(crate) fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
}

/// Runs futures concurrently, keeping their order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    futures::future::join_all(futures).await
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn group_views(members: &[Member]) -> Vec<GroupView> {
    let mut groups: BTreeMap<(u8, u64), GroupView> = BTreeMap::new();
    for m in members {
        let Ok(status) = &m.status else { continue };
        for g in status["groups"].as_array().into_iter().flatten() {
            let name = g["group"].as_str().unwrap_or_default().to_string();
            // Metadata first, then partitions by number.
            let key = match g["partition"].as_u64() {
                None => (0, 0),
                Some(p) => (1, p),
            };
            let view = groups.entry(key).or_insert_with(|| GroupView {
                name,
                leader: None,
                voters: ids(&g["voters"]),
                learners: ids(&g["learners"]),
                applied: BTreeMap::new(),
                lag: BTreeMap::new(),
            });
            view.applied
                .insert(m.id, g["applied"].as_u64().unwrap_or(0));
            if let Some(leader) = g["leader"].as_u64() {
                view.leader = Some(view.leader.map_or(leader, |l| l.max(leader)));
            }
            if g["is_leader"].as_bool() == Some(true) {
                view.leader = Some(m.id);
                view.voters = ids(&g["voters"]);
                view.learners = ids(&g["learners"]);
                if let Some(lag) = g["replication_lag"].as_object() {
                    view.lag = lag
                        .iter()
                        .filter_map(|(id, n)| Some((id.parse().ok()?, n.as_u64()?)))
                        .collect();
                }
            }
        }
    }
    // A leader named by followers that is no longer a voter (it just moved its replica away)
    // leads nothing: an election follows.
    groups
        .into_values()
        .map(|mut g| {
            if g.leader.is_some_and(|l| !g.voters.contains(&l)) {
                g.leader = None;
            }
            g
        })
        .collect()
}
