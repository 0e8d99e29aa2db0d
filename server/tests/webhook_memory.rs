//! What the admission webhook allocates to answer a review, counted by jemalloc, for bodies of the largest size it accepts made up the ways an attacker
//! would make them: the webhook's port answers anyone, so a body is whatever its sender likes.
//! Beside each, the same body read as a generic JSON tree, which is what the webhook did
//! before and what the figures are compared with.

use std::sync::Arc;

use podiam_server::watch::Cluster;
use podiam_server::webhook::{ENDPOINT_URL, Injection, Webhook};

// The server's own allocator, whose count of what each thread allocates the test reads.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The bytes this thread allocated while `f` ran, all of them, freed or not since: at
/// least the most it held at once.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let counter = tikv_jemalloc_ctl::thread::allocatedp::read().expect("jemalloc's statistics");
    let before = counter.get();
    let value = f();
    (value, (counter.get() - before) as usize)
}

const MIB: usize = 1 << 20;
/// The largest body the webhook reads (the API server's own limit on a request).
const MAX_BODY: usize = 3 * MIB;

/// A pod creation review in a namespace, the pod asking for a role (so that a role applies
/// and the webhook would patch it), with `spec` and `annotations` as given (JSON text).
fn review(spec: &str, annotations: &str) -> Vec<u8> {
    format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u-1","kind":{{"group":"","version":"v1","kind":"Pod"}},"operation":"CREATE","namespace":"team-a","object":{{"metadata":{{"namespace":"team-a","annotations":{{{annotations}"iam.amazonaws.com/role":"app"}}}},"spec":{spec}}}}}}}"#
    )
    .into_bytes()
}

/// `item` repeated, comma-separated, as many times as fit in about `bytes`.
fn many(item: &str, bytes: usize) -> String {
    let n = bytes / (item.len() + 1);
    vec![item; n].join(",")
}

#[test]
fn a_review_costs_about_its_body_however_it_is_made_up() {
    let cluster = Arc::new(Cluster::default());
    cluster.mark_synced();
    let injection = Injection {
        audience: "podiam".into(),
        expiration_seconds: 86400,
        endpoint_url: ENDPOINT_URL.into(),
    };
    let webhook = Webhook::new(cluster, injection);
    let room = MAX_BODY - 1024;
    let containers = |list: String| format!(r#"{{"containers":[{list}]}}"#);
    // (what, body, most the webhook may allocate for it, whether it is answered). The patch
    // for the most containers the webhook patches is the one answer that costs more than
    // the body: a few hundred bytes per container, built and encoded, with every copy made
    // on the way counted.
    let shapes = [
        (
            "a million empty containers",
            review(&containers(many("{}", room)), ""),
            MIB,
            false,
        ),
        (
            "one container of 200k environment variables",
            review(
                &containers(format!(r#"{{"env":[{}]}}"#, many(r#"{"name":"A"}"#, room))),
                "",
            ),
            MIB,
            true,
        ),
        (
            "400k annotations",
            review(
                r#"{"containers":[{}]}"#,
                &format!("{},", many(r#""a":"""#, room)),
            ),
            MIB,
            true,
        ),
        (
            "400k volumes",
            review(
                &format!(
                    r#"{{"volumes":[{}],"containers":[{{}}]}}"#,
                    many(r#"{"name":"v"}"#, room)
                ),
                "",
            ),
            MIB,
            true,
        ),
        (
            "a million small numbers where nothing is read",
            review(
                &format!(
                    r#"{{"overhead":[{}],"containers":[{{}}]}}"#,
                    many("1", room)
                ),
                "",
            ),
            MIB,
            true,
        ),
        (
            "the most containers patched, 1024",
            review(&containers(vec!["{}"; 1024].join(",")), ""),
            16 * MIB,
            true,
        ),
    ];
    for (what, body, most, answered) in shapes {
        assert!(body.len() <= MAX_BODY, "{what}: {} bytes", body.len());
        let (answer, webhook_bytes) = allocated_by(|| webhook.review(&body));
        assert_eq!(answer.is_ok(), answered, "{what}: {:?}", answer.err());
        drop(answer);
        let (tree, tree_bytes) =
            allocated_by(|| serde_json::from_slice::<serde_json::Value>(&body));
        drop(tree);
        println!(
            "{what}: body {:.2} MiB, the webhook allocated {:.2} MiB, a generic tree {:.2} MiB",
            body.len() as f64 / MIB as f64,
            webhook_bytes as f64 / MIB as f64,
            tree_bytes as f64 / MIB as f64,
        );
        assert!(
            webhook_bytes <= most,
            "{what}: the webhook allocated {webhook_bytes} bytes (at most {most} allowed)"
        );
    }
}
