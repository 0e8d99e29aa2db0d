//! Generated certificates parsed back: files and modes, overwrite refusal, SANs, EKUs,
//! chain of trust, Secret manifests, and the binary's one-line refusal.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use podiam_certs::{CertBundle, CertOptions, CertsError, generate};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::*;

fn der_of(pem: &str) -> Vec<u8> {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    assert_eq!(pem.label, "CERTIFICATE");
    pem.contents
}

fn with_cert<R>(pem: &str, f: impl FnOnce(&X509Certificate<'_>) -> R) -> R {
    let der = der_of(pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    f(&cert)
}

fn sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some(ext) = cert.subject_alternative_name().unwrap() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns.push((*n).to_owned()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()))
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()))
                }
                other => panic!("unexpected SAN {other:?}"),
            }
        }
    }
    (dns, ips)
}

fn common_name(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn bundle() -> CertBundle {
    generate(&CertOptions::default()).unwrap()
}

#[test]
fn server_certificate_has_default_sans_and_server_auth() {
    let b = bundle();
    with_cert(&b.server_cert, |cert| {
        let (dns, ips) = sans(cert);
        for name in [
            "podiam-server",
            "podiam-server.podiam",
            "podiam-server.podiam.svc",
            "podiam-server.podiam.svc.cluster.local",
            "podiam-webhook.podiam.svc",
            "localhost",
        ] {
            assert!(dns.iter().any(|d| d == name), "{name} missing from {dns:?}");
        }
        assert_eq!(ips, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        assert!(!eku.client_auth);
        assert!(!cert.is_ca());
        assert_eq!(common_name(cert), "podiam-server");
    });
}

#[test]
fn configured_names_namespace_and_service() {
    let opts = CertOptions {
        namespace: "kube-system".into(),
        service: "iam".into(),
        extra_dns_names: vec!["iam.example.com".into()],
        ip_addresses: vec!["10.0.0.7".parse().unwrap(), "::1".parse().unwrap()],
        ..CertOptions::default()
    };
    let b = generate(&opts).unwrap();
    with_cert(&b.server_cert, |cert| {
        let (dns, ips) = sans(cert);
        assert_eq!(
            dns,
            [
                "iam",
                "iam.kube-system",
                "iam.kube-system.svc",
                "iam.kube-system.svc.cluster.local",
                "podiam-webhook.kube-system.svc",
                "iam.example.com"
            ]
        );
        assert_eq!(
            ips,
            [
                "10.0.0.7".parse::<IpAddr>().unwrap(),
                "::1".parse::<IpAddr>().unwrap()
            ]
        );
    });
}

#[test]
fn agent_certificate_is_client_auth_with_fixed_cn() {
    let b = bundle();
    with_cert(&b.agent_cert, |cert| {
        assert_eq!(common_name(cert), "podiam-agent");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth);
        assert!(!eku.server_auth);
        assert!(!cert.is_ca());
    });
}

#[test]
fn leaves_are_signed_by_the_ca_and_not_by_another() {
    let b = bundle();
    let other = bundle();
    let ca_der = der_of(&b.ca_cert);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca.is_ca());
    let other_der = der_of(&other.ca_cert);
    let (_, other_ca) = X509Certificate::from_der(&other_der).unwrap();
    assert_ne!(ca_der, other_der, "two runs give two CAs");
    for leaf in [&b.server_cert, &b.agent_cert] {
        with_cert(leaf, |cert| {
            assert_eq!(cert.issuer(), ca.subject());
            let ca_key = ca.public_key();
            // x509-parser is built without its verify features (they would pull a second
            // crypto provider); compare the authority key identifier instead.
            let aki = cert
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.clone(),
                    _ => None,
                })
                .unwrap();
            let ski = |c: &X509Certificate<'_>| {
                c.extensions()
                    .iter()
                    .find_map(|e| match e.parsed_extension() {
                        ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                        _ => None,
                    })
                    .unwrap()
            };
            assert_eq!(aki.0, ski(&ca).as_slice());
            assert_ne!(aki.0, ski(&other_ca).as_slice());
            assert!(!ca_key.raw.is_empty());
        });
    }
}

#[test]
fn validity_days_and_longer_ca() {
    let b = generate(&CertOptions {
        validity_days: 30,
        ca_validity_days: 60,
        ..CertOptions::default()
    })
    .unwrap();
    let days = |pem: &str| {
        with_cert(pem, |c| {
            let v = c.validity();
            (v.not_after.timestamp() - v.not_before.timestamp()) / 86_400
        })
    };
    // not_before is backdated by a few minutes for clock skew.
    assert_eq!(days(&b.server_cert), 30);
    assert_eq!(days(&b.agent_cert), 30);
    assert_eq!(days(&b.ca_cert), 60);
    assert!(with_cert(&b.server_cert, |c| c.validity().is_valid()));
}

#[test]
fn ca_shorter_than_leaves_is_rejected() {
    let err = generate(&CertOptions {
        validity_days: 400,
        ca_validity_days: 100,
        ..CertOptions::default()
    })
    .unwrap_err();
    assert!(matches!(err, CertsError::InvalidOptions(_)), "{err}");
}

#[test]
fn files_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/out");
    let b = bundle();
    let files = b.write_to(&out, false).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for key in [&files.ca_key, &files.server_key, &files.agent_key] {
        assert_eq!(mode(key), 0o600, "{}", key.display());
    }
    for cert in [&files.ca_cert, &files.server_cert, &files.agent_cert] {
        assert_eq!(mode(cert), 0o644, "{}", cert.display());
    }
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "agent-key.pem",
            "agent.pem",
            "ca-key.pem",
            "ca.pem",
            "server-key.pem",
            "server.pem"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(&files.server_cert).unwrap(),
        b.server_cert
    );
    assert_eq!(
        std::fs::read_to_string(&files.agent_key).unwrap(),
        b.agent_key
    );
    assert!(b.agent_key.starts_with("-----BEGIN PRIVATE KEY-----"));
}

#[test]
fn refuses_to_overwrite_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let first = bundle();
    first.write_to(dir.path(), false).unwrap();
    let second = bundle();
    let err = second.write_to(dir.path(), false).unwrap_err();
    assert!(matches!(err, CertsError::AlreadyExists(_)));
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(!err.to_string().contains('\n'));
    // Nothing was replaced.
    let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    assert_eq!(ca, first.ca_cert);

    // A single leftover file is enough to refuse.
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::write(dir2.path().join("agent-key.pem"), "old").unwrap();
    assert!(matches!(
        second.write_to(dir2.path(), false),
        Err(CertsError::AlreadyExists(p)) if p.ends_with("agent-key.pem")
    ));
    assert!(
        !dir2.path().join("ca.pem").exists(),
        "nothing written on refusal"
    );

    // --force replaces, and resets a loosened key mode.
    let key = dir.path().join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    second.write_to(dir.path(), true).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        second.ca_cert
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn links_planted_in_the_output_directory_are_never_followed() {
    let dir = tempfile::tempdir().expect("a directory");
    let elsewhere = tempfile::tempdir().expect("another");
    let victim = elsewhere.path().join("victim");
    std::fs::write(&victim, "precious").expect("written");
    // --force over a link: the link goes, the file it named stays as it was.
    std::os::unix::fs::symlink(&victim, dir.path().join("ca.pem")).expect("a link");
    let bundle = bundle();
    bundle.write_to(dir.path(), true).expect("written");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
    let ca = dir.path().join("ca.pem");
    assert!(
        !std::fs::symlink_metadata(&ca)
            .expect("there")
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&ca).expect("read"), bundle.ca_cert);
    // A renewal's staging file planted as a link: the same.
    std::os::unix::fs::symlink(&victim, dir.path().join("server-key.pem.new")).expect("a link");
    bundle.replace_leaves_in(dir.path()).expect("replaced");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("server-key.pem")).expect("read"),
        bundle.server_key
    );
}

#[test]
fn secret_manifests_shape() {
    use base64::Engine;
    let b = bundle();
    let yaml = b.secret_manifests("team-a");
    let docs: Vec<&str> = yaml.split("---\n").collect();
    assert_eq!(docs.len(), 2);
    for (doc, name, cert, key) in [
        (docs[0], "podiam-server-tls", &b.server_cert, &b.server_key),
        (docs[1], "podiam-agent-tls", &b.agent_cert, &b.agent_key),
    ] {
        assert!(doc.starts_with("apiVersion: v1\nkind: Secret\n"), "{doc}");
        assert!(doc.contains(&format!("\n  name: {name}\n")), "{doc}");
        assert!(doc.contains("\n  namespace: team-a\n"), "{doc}");
        assert!(doc.contains("\ntype: kubernetes.io/tls\n"), "{doc}");
        let field = |k: &str| {
            let line = doc
                .lines()
                .find_map(|l| l.strip_prefix(&format!("  {k}: ")))
                .unwrap_or_else(|| panic!("{k} missing in {doc}"));
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(line)
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(&field("tls.crt"), cert);
        assert_eq!(&field("tls.key"), key);
        assert_eq!(field("ca.crt"), b.ca_cert);
    }
}

#[test]
fn debug_redacts_keys() {
    let b = bundle();
    let dbg = format!("{b:?}");
    assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    assert!(dbg.contains("CERTIFICATE"));
}

#[test]
fn binary_writes_files_and_refuses_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let secrets = dir.path().join("secrets.yaml");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_podiam-certs"))
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .env("PODIAM_CERTS_OUT", &out)
            .args([
                "--secrets",
                secrets.to_str().unwrap(),
                "--dns-name",
                "x.example",
            ])
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains(out.to_str().unwrap()));
    assert!(out.join("server.pem").exists());
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let second = run();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
}

#[test]
fn renewal_keeps_the_ca_and_issues_new_leaves_from_it() {
    let first = bundle();
    let renewed =
        podiam_certs::renew(&first.ca_cert, &first.ca_key, &CertOptions::default()).unwrap();
    assert_eq!(renewed.ca_cert, first.ca_cert);
    assert_ne!(renewed.server_cert, first.server_cert);
    assert_ne!(renewed.agent_key, first.agent_key);
    let (_, ca) = X509Certificate::from_der(&der_of(&first.ca_cert))
        .map(|(rest, ca)| (rest.to_vec(), ca.subject().to_string()))
        .unwrap();
    for leaf in [&renewed.server_cert, &renewed.agent_cert] {
        with_cert(leaf, |cert| assert_eq!(cert.issuer().to_string(), ca));
    }
    let garbage = podiam_certs::renew("not a certificate", &first.ca_key, &CertOptions::default());
    assert!(matches!(garbage, Err(CertsError::ReadCa(_))), "{garbage:?}");
}

#[test]
fn leaves_never_outlive_their_ca_and_validity_is_bounded() {
    let short = generate(&CertOptions {
        validity_days: 30,
        ca_validity_days: 60,
        ..CertOptions::default()
    })
    .unwrap();
    let longer = CertOptions {
        validity_days: 90,
        ca_validity_days: 90,
        ..CertOptions::default()
    };
    let refused = podiam_certs::renew(&short.ca_cert, &short.ca_key, &longer).unwrap_err();
    assert!(
        matches!(refused, CertsError::InvalidOptions(_)),
        "{refused}"
    );
    assert!(refused.to_string().contains("--days 59"), "{refused}");
    let within = CertOptions {
        validity_days: 59,
        ca_validity_days: 59,
        ..CertOptions::default()
    };
    assert!(podiam_certs::renew(&short.ca_cert, &short.ca_key, &within).is_ok());
    for (days, ca_days) in [(365, u32::MAX), (u32::MAX, u32::MAX)] {
        let err = generate(&CertOptions {
            validity_days: days,
            ca_validity_days: ca_days,
            ..CertOptions::default()
        })
        .unwrap_err();
        assert!(matches!(err, CertsError::InvalidOptions(_)), "{err}");
    }
}

#[test]
fn binary_renews_the_leaves_and_keeps_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_podiam-certs"))
            .env_clear()
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(run(&[]).status.success());
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let (ca, server) = (read("ca.pem"), read("server.pem"));
    let renewed = run(&["--renew"]);
    assert!(renewed.status.success(), "{renewed:?}");
    assert_eq!(read("ca.pem"), ca);
    assert_ne!(read("server.pem"), server);
    let mode = std::fs::metadata(out.join("server-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!out.join("server.pem.new").exists());

    let empty = dir.path().join("empty");
    let refused = Command::new(env!("CARGO_BIN_EXE_podiam-certs"))
        .env_clear()
        .args(["--out", empty.to_str().unwrap(), "--renew"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--renew needs the CA"), "{stderr}");
}
