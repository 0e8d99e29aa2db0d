//! The server's mutual TLS, against the real `podiam-server`: a client certificate from the
//! project's CA is accepted; one from another CA is refused; none at all passes the
//! handshake (for operators) but no agent call. Needs root
//! (the server runs inside a full [`World`]). Also: certificates rotated on disk are used
//! for new connections without a restart, and expired ones are refused.

use podiam_proto::v1::HealthRequest;
use podiam_proto::v1::podiam_client::PodiamClient;
use podiam_runtime::tls::TlsMaterial;
use podiam_tests::world::{World, WorldConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

async fn health(world: &World, tls: ClientTlsConfig) -> Result<bool, String> {
    let endpoint = Endpoint::from_shared(format!("https://{}", world.server_addr()))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    PodiamClient::new(channel)
        .health(HealthRequest {})
        .await
        .map(|r| r.get_ref().synced)
        .map_err(|status| format!("health: {status:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_agents_without_a_certificate_from_its_ca() {
    let world = World::start(WorldConfig::default())
        .await
        .expect("world starts");
    let files = world.certs();
    let ours = TlsMaterial::from_pem(
        std::fs::read(&files.ca_cert).expect("ca"),
        std::fs::read(&files.agent_cert).expect("cert"),
        std::fs::read(&files.agent_key).expect("key"),
    );
    // The positive control: the agent's own certificate works.
    assert_eq!(
        health(&world, ours.client_config("localhost")).await,
        Ok(true)
    );

    // A certificate from another CA (the client still trusts the real server's CA).
    let foreign = podiam_certs::generate(&podiam_certs::CertOptions::default()).expect("other CA");
    let server_ca = Certificate::from_pem(std::fs::read(&files.ca_cert).expect("ca"));
    let foreign_tls = ClientTlsConfig::new()
        .ca_certificate(server_ca.clone())
        .identity(Identity::from_pem(&foreign.agent_cert, &foreign.agent_key))
        .domain_name("localhost");
    let refused = health(&world, foreign_tls).await;
    assert!(
        refused.is_err(),
        "a foreign client certificate was accepted: {refused:?}"
    );

    // No client certificate at all: the handshake is allowed (operators' explain and status
    // authenticate with their Kubernetes token instead), Health answers, and agent calls
    // are refused, even with the agent's token.
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(server_ca)
        .domain_name("localhost");
    assert_eq!(health(&world, anonymous).await, Ok(true));
    let token = std::fs::read_to_string(world.agent_token_file()).expect("agent token");
    let refused = world
        .operator_client(Some(&token))
        .await
        .expect("client")
        .get_pod_role(podiam_proto::v1::GetPodRoleRequest {
            ip: "10.0.0.1".into(),
            node_name: podiam_tests::world::NODE_NAME.into(),
        })
        .await
        .expect_err("an agent call without the agent's certificate");
    assert_eq!(
        podiam_proto::Reason::of(&refused),
        Some(podiam_proto::Reason::AgentUnauthenticated),
        "{refused:?}"
    );
    assert!(
        refused.message().contains("client certificate"),
        "{refused:?}"
    );

    // And the agent refuses a server whose name does not match.
    let wrong_name = health(&world, ours.client_config("not-the-server.example")).await;
    assert!(
        wrong_name.is_err(),
        "a server certificate for another name was accepted"
    );
}

/// The certificate a fresh TLS connection to the server is shown (DER), dialled with the
/// agent's files.
async fn served_certificate(world: &World) -> Result<Vec<u8>, String> {
    let files = world.certs();
    let checked = podiam_runtime::tls::TlsFiles {
        ca: files.ca_cert.clone(),
        cert: files.agent_cert.clone(),
        key: files.agent_key.clone(),
    }
    .load_checked(std::time::SystemTime::now())
    .map_err(|e| e.to_string())?;
    let config = podiam_runtime::tls::client_config(&checked).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(world.server_addr())
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or("no server certificate")?;
    Ok(leaf.to_vec())
}

fn der(pem: &str) -> Vec<u8> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    block.contents
}

fn tls_of(ca: &str, cert: &str, key: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost")
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_certificates_are_used_for_new_connections_without_a_restart() {
    let world = World::start(WorldConfig {
        server_args: vec!["--tls-reload-interval".into(), "1s".into()],
        ..WorldConfig::default()
    })
    .await
    .expect("world starts");
    let files = world.certs().clone();
    let dir = files.ca_cert.parent().expect("certs dir").to_path_buf();
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("read");
    let (ca1, ca1_key) = (read(&files.ca_cert), read(&files.ca_key));
    let (agent1, agent1_key) = (read(&files.agent_cert), read(&files.agent_key));
    assert_eq!(
        served_certificate(&world).await,
        Ok(der(&read(&files.server_cert)))
    );
    // A connection opened before the rotation, kept open through it.
    let channel = Endpoint::from_shared(format!("https://{}", world.server_addr()))
        .expect("endpoint")
        .tls_config(tls_of(&ca1, &agent1, &agent1_key))
        .expect("tls")
        .connect()
        .await
        .expect("connected");
    let mut before = PodiamClient::new(channel);
    assert!(before.health(HealthRequest {}).await.is_ok());
    let rotations = |world: &World| {
        world
            .server_log_text()
            .matches("TLS certificate rotated")
            .count()
    };

    // 1. New leaves from the same CA (a renewal): new connections are shown the new one.
    let renewed =
        podiam_certs::renew(&ca1, &ca1_key, &podiam_certs::CertOptions::default()).expect("renew");
    renewed.replace_leaves_in(&dir).expect("replaced");
    podiam_tests::process::wait_until(
        std::time::Duration::from_secs(10),
        "the server to rotate",
        || async { rotations(&world) >= 1 },
    )
    .await
    .expect("rotated");
    assert_eq!(
        served_certificate(&world).await,
        Ok(der(&renewed.server_cert)),
        "a new connection gets the renewed certificate, with no restart"
    );
    assert!(
        before.health(HealthRequest {}).await.is_ok(),
        "the connection opened before the rotation still works"
    );
    let foreign = podiam_certs::generate(&podiam_certs::CertOptions::default()).expect("other CA");
    assert!(
        health(
            &world,
            tls_of(&ca1, &foreign.agent_cert, &foreign.agent_key)
        )
        .await
        .is_err(),
        "another CA's certificate is refused after the rotation"
    );
    assert_eq!(
        health(
            &world,
            tls_of(&ca1, &renewed.agent_cert, &renewed.agent_key)
        )
        .await,
        Ok(true)
    );

    // 2. A whole new CA: the old CA's certificates are now the foreign ones.
    let ca2 = podiam_certs::generate(&podiam_certs::CertOptions::default()).expect("new CA");
    ca2.write_to(&dir, true).expect("new CA written");
    // The files are written one after another: a reload that sees the new CA beside the old
    // certificate refuses it (the certificate does not chain to it) and keeps the old
    // configuration; the rotation comes once the rest is there. Done once the new CA's agents
    // are served.
    podiam_tests::process::wait_until(
        std::time::Duration::from_secs(10),
        "the server to serve the new CA's agents",
        || async {
            rotations(&world) >= 2
                && health(
                    &world,
                    tls_of(&ca2.ca_cert, &ca2.agent_cert, &ca2.agent_key),
                )
                .await
                    == Ok(true)
        },
    )
    .await
    .expect("rotated");
    assert!(
        health(
            &world,
            tls_of(&ca2.ca_cert, &renewed.agent_cert, &renewed.agent_key)
        )
        .await
        .is_err(),
        "a certificate of the replaced CA is refused"
    );
    assert!(
        health(
            &world,
            tls_of(&ca2.ca_cert, &foreign.agent_cert, &foreign.agent_key)
        )
        .await
        .is_err(),
        "another CA's certificate is still refused"
    );

    // 3. An expired certificate from the right CA: refused, with a line saying so.
    let expired = expired_client_certificate(&ca2.ca_cert, &ca2.ca_key);
    assert!(
        health(&world, tls_of(&ca2.ca_cert, &expired.0, &expired.1))
            .await
            .is_err(),
        "an expired certificate is refused"
    );
    podiam_tests::process::wait_until(
        std::time::Duration::from_secs(5),
        "the refusal to be logged",
        || async {
            world.server_log_text().lines().any(|l| {
                l.contains("TLS handshake refused") && l.to_lowercase().contains("expired")
            })
        },
    )
    .await
    .expect("logged");

    // 4. Expired files on disk are not loaded: the server keeps the certificate it has.
    let in_use = served_certificate(&world).await.expect("served");
    std::fs::write(&files.server_cert, &expired.0).expect("expired cert written");
    std::fs::write(&files.server_key, &expired.1).expect("its key written");
    podiam_tests::process::wait_until(
        std::time::Duration::from_secs(10),
        "the refusal of the expired files to be logged",
        || async { world.server_log_text().contains("new TLS files refused") },
    )
    .await
    .expect("refused");
    assert_eq!(served_certificate(&world).await, Ok(in_use));
}

/// A client certificate (PEM) and key signed by the CA, valid only in January 2020.
fn expired_client_certificate(ca_cert: &str, ca_key: &str) -> (String, String) {
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(ca_cert, rcgen::KeyPair::from_pem(ca_key).expect("ca key"))
            .expect("issuer");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "podiam-agent");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 31);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_an_expired_certificate_does_not_start_and_says_why() {
    let world = World::start(WorldConfig {
        sts_proxy: true,
        ..WorldConfig::default()
    })
    .await
    .expect("world starts");
    let files = world.certs();
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("read");
    let (cert, key) = expired_client_certificate(&read(&files.ca_cert), &read(&files.ca_key));
    let dir = world.dir().join("expired");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut expired = files.clone();
    expired.server_cert = dir.join("server.pem");
    expired.server_key = dir.join("server-key.pem");
    std::fs::write(&expired.server_cert, cert).expect("cert");
    std::fs::write(&expired.server_key, key).expect("key");
    let (mut server, _) = podiam_tests::world::spawn_server(
        &expired,
        world.kubeconfig(),
        &world.sts_proxy().endpoint(),
        &[],
    )
    .expect("spawned");
    let status = server
        .wait_exit(std::time::Duration::from_secs(20))
        .await
        .expect("exits");
    assert!(!status.success());
    let log = server.log_tail(20);
    assert!(
        log.contains("server.pem expired at 2020-01-31T00:00:00Z"),
        "one line naming the file and the date:\n{log}"
    );
}
