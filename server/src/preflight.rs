//! Checks that need the network, made once at start before anything is served: the base
//! ARN auto-detected from the node's instance profile, and the STS endpoint reachable.
//! Each failure is one line, like the flag checks in [`crate::config`].

use std::time::Duration;

use crate::config::ValidConfig;
use crate::policy::base_arn_of_instance_profile;

/// Completes `config` (the detected base ARN) and returns every problem found.
pub async fn preflight(config: &mut ValidConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let timeout = config.sts.attempt_timeout;
    if let Some(metadata_endpoint) = &config.detect_base_arn_from {
        match detect_base_arn(metadata_endpoint, timeout).await {
            Ok(base) => {
                tracing::info!(base_role_arn = %base, "base role ARN detected from the instance profile");
                config.base_role_arn = Some(base);
            }
            Err(why) => problems.push(format!(
                "--base-role-arn-autodetect: {why} (set --base-role-arn instead)"
            )),
        }
    }
    let (endpoint, from) = match &config.sts.endpoint {
        Some(endpoint) => (endpoint.clone(), "--sts-endpoint"),
        None => (regional_sts_endpoint(&config.sts.region), "--region"),
    };
    if let Err(why) = reachable(&endpoint, timeout).await {
        problems.push(format!(
            "the STS endpoint {endpoint} (from {from}) is unreachable: {why}"
        ));
    }
    problems
}

/// The regional STS endpoint the SDK uses for `region`.
pub fn regional_sts_endpoint(region: &str) -> String {
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("https://sts.{region}.{suffix}")
}

/// The base ARN of the account of the instance profile the metadata service reports.
pub async fn detect_base_arn(endpoint: &str, timeout: Duration) -> Result<String, String> {
    let client = aws_config::imds::Client::builder()
        .endpoint(endpoint)
        .map_err(|e| format!("bad metadata endpoint {endpoint:?}: {e}"))?
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .max_attempts(2)
        .build();
    let info = client
        .get("/latest/meta-data/iam/info")
        .await
        .map_err(|e| format!("reading iam/info from {endpoint}: {e}"))?;
    let info: serde_json::Value = serde_json::from_str(info.as_ref())
        .map_err(|e| format!("iam/info from {endpoint} is not JSON: {e}"))?;
    let profile = info["InstanceProfileArn"]
        .as_str()
        .ok_or_else(|| format!("iam/info from {endpoint} has no InstanceProfileArn"))?;
    base_arn_of_instance_profile(profile)
        .ok_or_else(|| format!("{profile:?} is not an instance profile ARN"))
}

/// Whether a TCP connection to the URL's host and port opens within `timeout`.
async fn reachable(url: &str, timeout: Duration) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let host = uri.host().ok_or("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {}ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regional_endpoints() {
        assert_eq!(
            regional_sts_endpoint("eu-west-1"),
            "https://sts.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            regional_sts_endpoint("cn-north-1"),
            "https://sts.cn-north-1.amazonaws.com.cn"
        );
    }

    /// A metadata service answering the IMDSv2 token PUT and iam/info with `info`.
    async fn fake_imds(info: &'static str) -> (String, tokio_util::sync::CancellationToken) {
        use http_body_util::Full;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = tokio_util::sync::CancellationToken::new();
        let handler = move |_, request: http::Request<hyper::body::Incoming>| {
            let (status, body) = match (request.method().as_str(), request.uri().path()) {
                ("PUT", "/latest/api/token") => (200, "TOKEN"),
                ("GET", "/latest/meta-data/iam/info")
                    if request.headers().get("x-aws-ec2-metadata-token")
                        == Some(&http::HeaderValue::from_static("TOKEN")) =>
                {
                    (200, info)
                }
                _ => (404, ""),
            };
            let mut response = http::Response::new(Full::new(bytes::Bytes::from(body)));
            *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
            if status == 200 && request.uri().path() == "/latest/api/token" {
                response.headers_mut().insert(
                    "x-aws-ec2-metadata-token-ttl-seconds",
                    http::HeaderValue::from_static("21600"),
                );
            }
            async move { response }
        };
        tokio::spawn(podiam_runtime::serve::serve_http(
            listener,
            podiam_runtime::serve::Limits::default(),
            handler,
            stop.clone(),
        ));
        (url, stop)
    }

    #[tokio::test]
    async fn the_base_arn_is_detected_from_the_instance_profile() {
        let (url, stop) = fake_imds(
            r#"{"Code":"Success","InstanceProfileArn":"arn:aws:iam::210987654321:instance-profile/nodes.example","InstanceProfileId":"AIPA"}"#,
        )
        .await;
        assert_eq!(
            detect_base_arn(&url, Duration::from_secs(2)).await,
            Ok("arn:aws:iam::210987654321:role/".to_string())
        );
        stop.cancel();
        let (url, stop) = fake_imds(r#"{"Code":"Success"}"#).await;
        let missing = detect_base_arn(&url, Duration::from_secs(2)).await;
        assert!(
            missing
                .as_ref()
                .is_err_and(|e| e.contains("no InstanceProfileArn")),
            "{missing:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn reachability_is_a_real_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let open = listener.local_addr().expect("addr");
        assert_eq!(
            reachable(&format!("http://{open}"), Duration::from_secs(2)).await,
            Ok(())
        );
        drop(listener);
        let closed = reachable(&format!("http://{open}"), Duration::from_secs(2)).await;
        assert!(closed.is_err(), "{closed:?}");
        assert!(
            reachable("::nonsense", Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
