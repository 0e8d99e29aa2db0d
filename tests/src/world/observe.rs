//! What a test reads to judge: the agent's and the servers' metrics and logs (across
//! restarts), and a Prometheus sample's value that fails loudly on a metric that does not
//! exist.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{AGENT_HEALTH_PORT, World};
use crate::process::ChildGuard;

impl World {
    /// The agent's `/metrics` text, read inside the node namespace.
    pub async fn agent_metrics(&self) -> anyhow::Result<String> {
        let reply = self
            .node
            .netns()
            .http_get(
                &format!("http://127.0.0.1:{AGENT_HEALTH_PORT}/metrics"),
                Duration::from_secs(2),
            )
            .await?;
        if reply.status != 200 {
            bail!("/metrics answered {}", reply.status);
        }
        Ok(reply.body)
    }

    /// Waits until the agent's node stream has synced (`podiam_agent_node_stream_synced` is
    /// 1): from then on the agent holds the node's pods, binds each new IMDSv2 token to its
    /// pod and caches credentials; until then it asks a server for each request, and binds
    /// tokens to the address alone. A test that counts the agent's cache or checks a token's
    /// binding waits for this first; `/ready` only says that a server answers.
    pub async fn wait_node_stream_synced(&self) -> anyhow::Result<()> {
        let synced = crate::process::wait_until(
            super::START_TIMEOUT,
            "the agent's node stream to sync",
            || async {
                self.agent_metrics()
                    .await
                    .is_ok_and(|m| metric_value(&m, "podiam_agent_node_stream_synced") == 1)
            },
        )
        .await;
        synced.map_err(|e| {
            anyhow::anyhow!(
                "{e}; agent log:
{}",
                self.agent_log()
            )
        })
    }

    /// The (first) server's `/metrics` text.
    pub async fn server_metrics(&self) -> anyhow::Result<String> {
        self.server_metrics_of(0).await
    }

    /// Server replica `i`'s `/metrics` text (an error after 2 s: a stopped replica).
    pub async fn server_metrics_of(&self, i: usize) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.replica(i).health);
        tokio::time::timeout(Duration::from_secs(2), http_get_text(&url))
            .await
            .with_context(|| format!("{url} did not answer"))?
    }

    /// The agent's recent log lines (for failure messages).
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map_or_else(|| "(agent not running)".to_string(), |a| a.log_tail(60))
    }

    /// Every agent's whole log so far, oldest first.
    pub fn agent_log_text(&self) -> String {
        self.earlier_agent_logs
            .iter()
            .map(PathBuf::as_path)
            .chain(self.agent.as_ref().map(ChildGuard::log_path))
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .collect()
    }

    /// The (first) server's recent log lines (for failure messages).
    pub fn server_log(&self) -> String {
        self.replica(0)
            .process
            .as_ref()
            .map_or_else(|| "(server not running)".to_string(), |s| s.log_tail(60))
    }

    /// The (first) server's whole log so far.
    pub fn server_log_text(&self) -> String {
        self.server_log_text_of(0)
    }

    /// Server replica `i`'s whole log so far, across restarts.
    pub fn server_log_text_of(&self, i: usize) -> String {
        let replica = self.replica(i);
        replica
            .earlier_logs
            .iter()
            .map(PathBuf::as_path)
            .chain(replica.process.as_ref().map(ChildGuard::log_path))
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .collect()
    }
}

/// GETs a URL from this (root) namespace — loopback only — and returns the body of a 2xx.
pub async fn http_get_text(url: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(url.parse::<http::Uri>()?).await?;
    if !response.status().is_success() {
        bail!("{url} answered {}", response.status());
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The value of one sample in a Prometheus text exposition, named with its labels exactly
/// as exported (`podiam_server_sts_calls_total{result="ok"}`). 0 when the metric is declared
/// (`# TYPE`) but has no sample with these labels yet (a counter not yet counted); panics
/// when the metric is not in the exposition at all (renamed, or never registered), so that
/// an "is 0" assertion cannot pass on a metric that does not exist.
pub fn metric_value(exposition: &str, sample: &str) -> u64 {
    let prefix = format!("{sample} ");
    if let Some(value) = exposition
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
    {
        return value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("sample {sample} is not a whole number: {value:?}"));
    }
    let name = sample.split('{').next().unwrap_or(sample);
    let family = ["_total", "_bucket", "_count", "_sum", "_created"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    let declared = exposition.lines().any(|line| {
        line.strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|declared| declared == name || declared == family)
    });
    assert!(
        declared,
        "no metric {name} in the exposition (renamed?); it has:\n{}",
        exposition
            .lines()
            .filter(|line| line.starts_with("# TYPE "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    0
}

#[cfg(test)]
mod metric_value_tests {
    use super::metric_value;

    const EXPOSITION: &str = "# HELP x_calls Calls.\n# TYPE x_calls counter\n\
        x_calls_total{result=\"ok\"} 3\n# TYPE x_streams gauge\nx_streams 2\n# EOF\n";

    #[test]
    fn a_sample_is_read_and_a_declared_one_without_it_is_zero() {
        assert_eq!(metric_value(EXPOSITION, r#"x_calls_total{result="ok"}"#), 3);
        assert_eq!(metric_value(EXPOSITION, "x_streams"), 2);
        assert_eq!(
            metric_value(EXPOSITION, r#"x_calls_total{result="error"}"#),
            0
        );
    }

    #[test]
    #[should_panic(expected = "no metric x_renamed")]
    fn a_metric_not_in_the_exposition_fails_loudly() {
        metric_value(EXPOSITION, "x_renamed");
    }
}
