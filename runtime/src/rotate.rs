//! Certificates that rotate on disk without a restart.
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, so all three files change at
//! once, about a minute after the Secret does. [`Rotating`] keeps the TLS configuration
//! built from the files current: [`Rotating::follow`] re-reads them every interval and,
//! when their bytes changed and the new material checks out ([`TlsFiles::load_checked`]),
//! swaps in a configuration built from it. Connections opened from then on use the new
//! certificates; connections already open keep theirs until they end.
//!
//! New files that do not check out (expired, not yet valid, a key that does not match, a
//! half-written file) are refused with one clear log line and the current configuration is
//! kept, so a bad Secret update never takes a working daemon down. The certificate in use
//! expiring is logged too, once, and its expiry is exported as a metric by each daemon.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::tls::{Checked, TlsError, TlsFiles, unix_seconds, utc};

/// How often the files are re-read by default: a Secret update takes the kubelet about a
/// minute to project, so ten seconds adds little to that and costs three small reads.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// A TLS configuration of type `C`, rebuilt from its files when they change.
pub struct Rotating<C> {
    files: TlsFiles,
    build: fn(&Checked) -> Result<C, TlsError>,
    current: RwLock<Arc<C>>,
    /// The bytes the current configuration was built from, and the last refused bytes (so a
    /// refusal is logged once, not every interval).
    seen: Mutex<Seen>,
    not_after: AtomicI64,
    warned_expired: AtomicBool,
}

#[derive(Default)]
struct Seen {
    loaded: [Vec<u8>; 3],
    /// The last refused bytes, and whether the refusal may pass with time (a certificate not
    /// valid yet: an issuer's clock a little ahead of this node's), so they are checked again
    /// at every reload, though not logged again.
    refused: Option<([Vec<u8>; 3], bool)>,
}

impl<C> std::fmt::Debug for Rotating<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotating")
            .field("files", &self.files)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What one look at the files found.
#[derive(Debug)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// New material is in use.
    Rotated {
        subject: String,
        serial: String,
        not_after: i64,
    },
    /// The files changed but were refused; the current configuration stays.
    Refused(TlsError),
    /// The same refused files as last time (already logged).
    StillRefused,
}

impl<C> Rotating<C> {
    /// Loads and checks the files now; any problem is an error (a daemon must not start with
    /// certificates it cannot use).
    pub fn load(
        files: TlsFiles,
        build: fn(&Checked) -> Result<C, TlsError>,
    ) -> Result<Self, TlsError> {
        let checked = files.load_checked(SystemTime::now())?;
        let config = build(&checked)?;
        tracing::info!(
            cert = %files.cert.display(),
            subject = %checked.subject,
            serial = %checked.serial,
            not_after = %utc(checked.not_after),
            "TLS certificate loaded"
        );
        Ok(Rotating {
            build,
            current: RwLock::new(Arc::new(config)),
            not_after: AtomicI64::new(checked.not_after),
            seen: Mutex::new(Seen {
                loaded: checked.source,
                refused: None,
            }),
            files,
            warned_expired: AtomicBool::new(false),
        })
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<C> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// When the certificate in use expires, seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// Re-reads the files and swaps in new material if they changed and check out at `now`.
    pub fn reload(&self, now: SystemTime) -> Reload {
        let read = |path: &std::path::Path| std::fs::read(path).unwrap_or_default();
        let bytes = [
            read(&self.files.ca),
            read(&self.files.cert),
            read(&self.files.key),
        ];
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if bytes == seen.loaded {
            seen.refused = None;
            return Reload::Unchanged;
        }
        let refused_before = match &seen.refused {
            Some((refused, may_pass)) if *refused == bytes => {
                if !may_pass {
                    return Reload::StillRefused;
                }
                true
            }
            _ => false,
        };
        let built = self
            .files
            .check(bytes.clone(), now)
            .and_then(|checked| Ok(((self.build)(&checked)?, checked)));
        match built {
            Ok((config, checked)) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                self.not_after.store(checked.not_after, Ordering::Relaxed);
                self.warned_expired.store(false, Ordering::Relaxed);
                seen.loaded = bytes;
                seen.refused = None;
                Reload::Rotated {
                    subject: checked.subject,
                    serial: checked.serial,
                    not_after: checked.not_after,
                }
            }
            Err(error) => {
                let may_pass = matches!(error, TlsError::NotYetValid { .. });
                seen.refused = Some((bytes, may_pass));
                // Files not valid yet are checked again each time, logged once; once valid
                // they may be refused for another reason, which is logged.
                if refused_before && may_pass {
                    Reload::StillRefused
                } else {
                    Reload::Refused(error)
                }
            }
        }
    }

    /// Re-reads the files every `interval` until `shutdown`, logging what changed.
    pub async fn follow(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let now = SystemTime::now();
            match self.reload(now) {
                Reload::Unchanged | Reload::StillRefused => {}
                Reload::Rotated {
                    subject,
                    serial,
                    not_after,
                } => tracing::info!(
                    cert = %self.files.cert.display(),
                    %subject,
                    %serial,
                    not_after = %utc(not_after),
                    "TLS certificate rotated: new connections use it, open ones keep theirs"
                ),
                Reload::Refused(error) => tracing::error!(
                    %error,
                    "new TLS files refused; still using the certificate loaded before"
                ),
            }
            let not_after = self.not_after();
            if unix_seconds(now) > not_after && !self.warned_expired.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    cert = %self.files.cert.display(),
                    not_after = %utc(not_after),
                    "the TLS certificate in use has expired and no valid replacement is on disk: peers will refuse new connections"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::server_config;

    use crate::tls::test_files::{server_files, written};

    /// New leaf certificates and keys in `dir`, signed by the CA of `files`.
    fn renew_leaves(dir: &std::path::Path, files: &podiam_certs::WrittenFiles) {
        let ca_cert = std::fs::read_to_string(&files.ca_cert).expect("ca");
        let ca_key = std::fs::read_to_string(&files.ca_key).expect("ca key");
        podiam_certs::renew(&ca_cert, &ca_key, &podiam_certs::CertOptions::default())
            .expect("renewed")
            .replace_leaves_in(dir)
            .expect("replaced");
    }

    #[test]
    fn a_certificate_not_valid_yet_is_swapped_in_once_it_is() {
        let (dir, files) = written();
        let rotating = Rotating::load(server_files(&files), server_config).expect("loads at start");
        let before = rotating.current();
        renew_leaves(dir.path(), &files);
        let renewed = server_files(&files)
            .load_checked(SystemTime::now())
            .expect("valid now");
        // Read a second before it is valid (its issuer's clock ahead of this node's): refused
        // once, logged once, and checked again at each reload until it is valid.
        let at = |unix: i64| std::time::UNIX_EPOCH + Duration::from_secs(unix as u64);
        let early = at(renewed.not_before - 1);
        assert!(matches!(
            rotating.reload(early),
            Reload::Refused(TlsError::NotYetValid { .. })
        ));
        assert!(matches!(rotating.reload(early), Reload::StillRefused));
        assert!(Arc::ptr_eq(&before, &rotating.current()), "old config kept");
        assert!(matches!(
            rotating.reload(at(renewed.not_before)),
            Reload::Rotated { .. }
        ));
        assert!(!Arc::ptr_eq(&before, &rotating.current()), "swapped in");

        // Renewed again, with the key of the certificate in use beside it: not valid yet at
        // first; once it is, refused for its key, and that is said too.
        let old_key = std::fs::read(&files.server_key).expect("key");
        renew_leaves(dir.path(), &files);
        std::fs::write(&files.server_key, old_key).expect("write");
        let cert = std::fs::read(&files.server_cert).expect("cert");
        let (_, parsed) = x509_parser::pem::parse_x509_pem(&cert).expect("PEM");
        let not_before = parsed
            .parse_x509()
            .expect("a certificate")
            .validity()
            .not_before
            .timestamp();
        assert!(matches!(
            rotating.reload(at(not_before - 1)),
            Reload::Refused(TlsError::NotYetValid { .. })
        ));
        assert!(matches!(
            rotating.reload(at(not_before)),
            Reload::Refused(TlsError::KeyMismatch { .. })
        ));
        assert!(matches!(
            rotating.reload(at(not_before)),
            Reload::StillRefused
        ));
    }

    #[test]
    fn rotation_swaps_in_good_files_and_keeps_the_old_on_bad_ones() {
        let (dir, files) = written();
        let rotating = Rotating::load(server_files(&files), server_config).expect("loads at start");
        let before = rotating.current();
        let now = SystemTime::now();
        assert!(matches!(rotating.reload(now), Reload::Unchanged));

        // A half-written certificate: refused once, then quietly until it changes.
        std::fs::write(&files.server_cert, "-----BEGIN CERTIFICATE-----\n").expect("write");
        assert!(matches!(rotating.reload(now), Reload::Refused(_)));
        assert!(matches!(rotating.reload(now), Reload::StillRefused));
        assert!(Arc::ptr_eq(&before, &rotating.current()), "old config kept");

        // Renewed leaves from the same CA: swapped in.
        renew_leaves(dir.path(), &files);
        match rotating.reload(now) {
            Reload::Rotated { subject, .. } => assert!(subject.contains("podiam-server")),
            other => panic!("expected a rotation, got {other:?}"),
        }
        assert!(
            !Arc::ptr_eq(&before, &rotating.current()),
            "new config in use"
        );
        assert!(matches!(rotating.reload(now), Reload::Unchanged));

        // A new CA caught written before the certificates it signs: refused, as the
        // certificate in use does not chain to it; swapped in once the rest is there.
        let current = rotating.current();
        let new_ca = podiam_certs::generate(&podiam_certs::CertOptions::default()).expect("CA");
        std::fs::write(&files.ca_cert, &new_ca.ca_cert).expect("write");
        assert!(matches!(
            rotating.reload(now),
            Reload::Refused(TlsError::NotSignedByCa { .. })
        ));
        assert!(
            Arc::ptr_eq(&current, &rotating.current()),
            "old config kept"
        );
        std::fs::write(&files.server_cert, &new_ca.server_cert).expect("write");
        std::fs::write(&files.server_key, &new_ca.server_key).expect("write");
        assert!(matches!(rotating.reload(now), Reload::Rotated { .. }));
        let ca_cert = new_ca.ca_cert;

        // The same files, checked at a time they have expired: refused, the current kept.
        let current = rotating.current();
        std::fs::write(
            &files.ca_cert,
            format!("{}{}", ca_cert, ca_cert), // a bundle: different bytes, same CA
        )
        .expect("write");
        let later = now + Duration::from_secs(3 * 365 * 86_400);
        assert!(matches!(
            rotating.reload(later),
            Reload::Refused(TlsError::Expired { .. })
        ));
        assert!(Arc::ptr_eq(&current, &rotating.current()));
    }
}
