//! The server's mutual TLS, against the real `podiam-server`: a client certificate from the
//! project's CA is accepted; one from another CA, or none at all, is refused. Needs root
//! (the server runs inside a full [`World`]).

use podiam_proto::tls::TlsMaterial;
use podiam_proto::v1::HealthRequest;
use podiam_proto::v1::podiam_client::PodiamClient;
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

    // No client certificate at all.
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(server_ca)
        .domain_name("localhost");
    let refused = health(&world, anonymous).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was accepted: {refused:?}"
    );

    // And the agent refuses a server whose name does not match.
    let wrong_name = health(&world, ours.client_config("not-the-server.example")).await;
    assert!(
        wrong_name.is_err(),
        "a server certificate for another name was accepted"
    );
}
