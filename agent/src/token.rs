//! IMDSv2 session tokens, issued by the agent itself and bound to the pod that asked, and the
//! keys that sign them, kept on the node so that tokens outlive the agent process.
//!
//! ## Tokens
//!
//! A token is `base64url(claim) "." base64url(HMAC-SHA256(key, claim))` with
//! `claim = ip "|" pod-uid "|" expiry`: it cannot be forged, and a token taken from one pod
//! fails in another — also in a new pod that reuses the first one's IP (another UID). The UID
//! is empty for tokens issued while the agent could not know it (no pod table yet); such
//! tokens are bound to the IP alone. A token names no key: it is checked against every key
//! that still verifies (at most three), newest first.
//!
//! ## Keys, and why they live on the node
//!
//! SDKs hold tokens for their whole TTL: aws-config (Rust) caches one for 6 hours and sends
//! it again after a 401, and the JavaScript SDK and botocore fetch a token and then use it on
//! new connections that may reach another agent process. A key drawn at each start would make
//! every agent restart or rolling update a failure for those SDKs. So the keys live in a file
//! on the node ([`KeyFile`], `--token-key-file`), mode 0600, which every agent on the node
//! reads — also a new agent that starts beside the old one during a rolling update.
//!
//! ## Rotation ([`KeyRing`])
//!
//! Every key carries the time from which it signs. The newest key whose time has come signs;
//! the others still verify until they retire. The schedule, in seconds:
//!
//! - a key signs for [`KEY_PERIOD`] (6 hours), then the next one takes over;
//! - a key that no longer signs still verifies for [`KEY_GRACE`] (6 hours): the longest TTL a
//!   token can have (EC2's limit, 21600 s, which botocore, the JavaScript SDK and aws-config
//!   all ask for), so every token a key signed expires before the key is dropped;
//! - the next key is written to the file [`KEY_LEAD`] (10 minutes) before it starts signing,
//!   and every agent reads the file every [`KEY_RELOAD_INTERVAL`] (30 seconds): each agent
//!   knows a key twenty reads before any agent signs with it.
//!
//! A key is thus on disk for at most 12 hours and 10 minutes, and at most three keys are:
//! the previous one (verifying), the current one, and the next one (verifying already).
//! Rotation is time-based, so agents sharing the file agree on the signing key without talking
//! to each other. Writes need no lock: the file is replaced atomically (a new file renamed over
//! it), a new file is created with a hard link that fails if another agent created it first,
//! and every agent adopts what the file says at each read. Two agents that stage a next key
//! at the same moment both write; the last rename wins and the other agent adopts it at its
//! next read, long before either key signs.
//!
//! ## When the file cannot be used
//!
//! Tokens are an anti-SSRF measure (a proof that the caller can send a PUT and read its
//! answer, from the pod's own address), not an identity: a key of this process alone protects
//! exactly as well, and only loses tokens at the next restart. So a key file that cannot be
//! used never stops the agent, which would cut every pod of the node off its credentials:
//!
//! - missing: created (the first start on a node);
//! - corrupt: replaced with the keys this agent holds, logged as an error (tokens signed by
//!   keys only the corrupt file held are refused);
//! - unreadable, or not writable: the agent signs with keys of its own process, logs an
//!   error, and tries the file again at every read. When the file is usable again its keys
//!   replace the process's, which still verify the tokens they signed for the longest TTL
//!   (aws-config sends a refused token again until its TTL ends).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aws_lc_rs::rand::SecureRandom;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroize;

/// The TTLs EC2 accepts for a token, in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21600;
/// The longest a token lives: EC2's largest TTL, in seconds.
pub const MAX_TTL_SECS: i64 = 21600;
/// How long each key signs (seconds): one longest token lifetime, so that at most one key
/// besides the current one still verifies.
pub const KEY_PERIOD: i64 = MAX_TTL_SECS;
/// How long a key still verifies after the next one took over (seconds): the longest token
/// lifetime, so no token outlives its key.
pub const KEY_GRACE: i64 = MAX_TTL_SECS;
/// How long before it signs a new key is written to the file (seconds): many reads (see
/// [`KEY_RELOAD_INTERVAL`]) for every agent of the node to know it first.
pub const KEY_LEAD: i64 = 600;
/// How often an agent reads the key file again (and rotates the keys when due).
pub const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(30);
/// HMAC-SHA256 key length: the hash's output length (RFC 2104, section 3).
const KEY_BYTES: usize = 32;
/// A token's claim (`IP|UID|expiry`) fits in this many bytes: an IPv6 address (at most 45),
/// a pod's UID (36; 100 of room) and an expiry (at most 20), with the separators.
const CLAIM_BYTES: usize = 192;
/// An HMAC-SHA256 tag, and its length in unpadded base64.
const TAG_BYTES: usize = 32;
const TAG_BASE64_BYTES: usize = 43;
/// The key file's first line.
const FILE_HEADER: &str = "podiam imds-token-keys v1";
/// More keys than this in a file means it was not written by an agent.
const MAX_KEYS_IN_FILE: usize = 16;
/// Largest key file read (a full file is under 200 bytes).
const MAX_FILE_BYTES: u64 = 4096;

/// Why a token was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token was issued to another address")]
    WrongAddress,
    #[error("token was issued to another pod")]
    WrongPod,
    #[error("token expired")]
    Expired,
}

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{} does not exist", .path.display())]
    Missing { path: PathBuf },
    #[error("reading {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a key file of podiam-agent: {why}", .path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("writing {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("drawing a new key")]
    Random,
}

/// HMAC-SHA256 keyed once: the key's inner and outer pads already hashed, so that a token
/// costs a copy of that state and three compressions of SHA-256. (aws-lc's HMAC, also keyed
/// once, copied and set up a context several times that size for every token: about a
/// microsecond per request on the token path.) The states are wiped when dropped.
type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// One signing key and the time (Unix seconds) from which it signs.
#[derive(Clone)]
struct Key {
    from: i64,
    secret: [u8; KEY_BYTES],
    mac: HmacSha256,
}

impl Key {
    fn new(from: i64, secret: [u8; KEY_BYTES]) -> Key {
        // A key shorter than SHA-256's 64-byte block is padded with zeros (RFC 2104,
        // section 2): the same MAC as keying with the 32 bytes, and it cannot fail.
        let mut block = [0u8; 64];
        block[..KEY_BYTES].copy_from_slice(&secret);
        let mac = HmacSha256::new(&block.into());
        // Wiped with writes the compiler keeps (a plain fill of a dead array may go).
        block.zeroize();
        Key { from, secret, mac }
    }

    /// This key's MAC state, `claim` fed to it.
    fn over(&self, claim: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(claim);
        mac
    }

    /// The MAC of `claim` under this key.
    fn sign(&self, claim: &[u8]) -> [u8; TAG_BYTES] {
        self.over(claim).finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `claim` under this key (compared in constant time).
    fn verifies(&self, claim: &[u8], tag: &[u8]) -> bool {
        self.over(claim).verify_slice(tag).is_ok()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("from", &self.from)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A fresh random secret from the system's generator.
fn random_secret() -> Option<[u8; KEY_BYTES]> {
    let mut secret = [0u8; KEY_BYTES];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut secret)
        .ok()?;
    Some(secret)
}

/// The keys of a node, oldest first; never empty. Pure: every decision takes `now` (Unix
/// seconds) and new secrets are handed in, so rotation is tested with an injected clock.
#[derive(Clone, Debug)]
pub struct KeyRing {
    oldest: Key,
    newer: Vec<Key>,
}

impl KeyRing {
    /// One key, signing from `from`.
    fn single(from: i64, secret: [u8; KEY_BYTES]) -> KeyRing {
        KeyRing {
            oldest: Key::new(from, secret),
            newer: Vec::new(),
        }
    }

    /// A ring of one new key that signs from `now`.
    pub fn fresh(now: i64, secret: [u8; KEY_BYTES]) -> KeyRing {
        KeyRing::single(now, secret)
    }

    fn keys(&self) -> impl DoubleEndedIterator<Item = &Key> {
        std::iter::once(&self.oldest).chain(&self.newer)
    }

    /// Builds a ring from keys in any order; `None` without keys.
    fn from_keys(mut keys: Vec<Key>) -> Option<KeyRing> {
        keys.sort_by_key(|k| k.from);
        let mut keys = keys.into_iter();
        let oldest = keys.next()?;
        Some(KeyRing {
            oldest,
            newer: keys.collect(),
        })
    }

    /// The key that signs at `now`: the newest whose time has come (the oldest if none has,
    /// after the clock went back).
    fn signing(&self, now: i64) -> &Key {
        self.newer
            .iter()
            .rev()
            .find(|k| k.from <= now)
            .unwrap_or(&self.oldest)
    }

    /// When the key at `index` (oldest first) retires: [`KEY_GRACE`] after its successor
    /// took over; `None` while it has no successor.
    fn retires_at(&self, index: usize) -> Option<i64> {
        self.keys()
            .nth(index + 1)
            .map(|next| next.from.saturating_add(KEY_GRACE))
    }

    /// The key at `index`, oldest first.
    fn key(&self, index: usize) -> Option<&Key> {
        match index {
            0 => Some(&self.oldest),
            i => self.newer.get(i - 1),
        }
    }

    /// Keys that verify at `now`, newest first: all but the retired ones. A key that signs
    /// only later verifies already, so an agent that switches a moment early is not refused.
    /// (An iterator: each request's token is checked here, with nothing allocated.)
    fn verifying(&self, now: i64) -> impl Iterator<Item = &Key> {
        (0..=self.newer.len())
            .rev()
            .filter(move |&i| self.retires_at(i).is_none_or(|at| at > now))
            .filter_map(|i| self.key(i))
    }

    /// The ring as it should be at `now`, or `None` if it already is: retired keys dropped,
    /// and the next key (secret from `fresh`) staged to sign from the end of the current key's
    /// period once that end is [`KEY_LEAD`] away — or [`KEY_LEAD`] from now, for a key that
    /// is overdue (an agent that was down for long). `None` also when `fresh` fails (the
    /// rotation is tried again at the next read).
    pub fn maintain(
        &self,
        now: i64,
        fresh: &mut dyn FnMut() -> Option<[u8; KEY_BYTES]>,
    ) -> Option<KeyRing> {
        let kept: Vec<Key> = self
            .keys()
            .enumerate()
            .filter(|(i, _)| self.retires_at(*i).is_none_or(|at| at > now))
            .map(|(_, key)| key.clone())
            .collect();
        let retired = kept.len() != self.newer.len() + 1;
        let current_from = self.signing(now).from;
        let staged = self.keys().any(|k| k.from > now);
        let due = now >= current_from.saturating_add(KEY_PERIOD - KEY_LEAD);
        let mut keys = kept;
        let mut staged_one = false;
        if !staged
            && due
            && let Some(secret) = fresh()
        {
            let from = current_from
                .saturating_add(KEY_PERIOD)
                .max(now.saturating_add(KEY_LEAD));
            keys.push(Key::new(from, secret));
            staged_one = true;
        }
        if retired || staged_one {
            KeyRing::from_keys(keys)
        } else {
            None
        }
    }

    /// When each key signs from, and when it retires (`None`: not scheduled yet).
    pub fn schedule(&self) -> Vec<(i64, Option<i64>)> {
        self.keys()
            .enumerate()
            .map(|(i, key)| (key.from, self.retires_at(i)))
            .collect()
    }

    /// The file's text: a header line, then `FROM KEY` per key (base64url).
    pub fn render(&self) -> String {
        let mut text = format!("{FILE_HEADER}\n");
        for key in self.keys() {
            text.push_str(&format!(
                "{} {}\n",
                key.from,
                URL_SAFE_NO_PAD.encode(key.secret)
            ));
        }
        text
    }

    /// Parses [`KeyRing::render`]'s text; the error says what is wrong, never a key.
    pub fn parse(text: &str) -> Result<KeyRing, String> {
        let mut lines = text.lines();
        if lines.next() != Some(FILE_HEADER) {
            return Err(format!("the first line is not {FILE_HEADER:?}"));
        }
        let mut keys = Vec::new();
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let number = n + 2;
            let (from, secret) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {number} is not `FROM KEY`"))?;
            let from: i64 = from
                .parse()
                .map_err(|_| format!("line {number}: {from:?} is not a Unix time"))?;
            let secret: [u8; KEY_BYTES] = URL_SAFE_NO_PAD
                .decode(secret.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| format!("line {number}: not a {KEY_BYTES}-byte base64url key"))?;
            if keys.iter().any(|k: &Key| k.from == from) {
                return Err(format!("line {number}: two keys sign from {from}"));
            }
            keys.push(Key::new(from, secret));
            if keys.len() > MAX_KEYS_IN_FILE {
                return Err(format!("more than {MAX_KEYS_IN_FILE} keys"));
            }
        }
        KeyRing::from_keys(keys).ok_or_else(|| "no key".to_string())
    }

    /// Whether both rings hold the same keys with the same times.
    fn same_as(&self, other: &KeyRing) -> bool {
        self.keys().count() == other.keys().count()
            && self
                .keys()
                .zip(other.keys())
                .all(|(a, b)| a.from == b.from && a.secret == b.secret)
    }
}

/// Issues and checks tokens with the node's current keys. Clones share the keys; the
/// [`KeyKeeper`] swaps in new ones as the file changes.
#[derive(Clone)]
pub struct TokenKey {
    ring: Arc<RwLock<Arc<KeyRing>>>,
    /// Keys that left the ring while tokens they signed could still be live (this process's
    /// own keys, when the file is usable again and its keys replace them), each with the time
    /// it stops verifying: the longest TTL after it left. Checked only for tokens no key of
    /// the ring verifies.
    departed: Arc<RwLock<Vec<(Key, i64)>>>,
}

/// Most departed keys kept: the file can come and go at most once per read.
const MAX_DEPARTED: usize = 8;

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// A random key of this process alone, never rotated (tests, and tools without a node).
    pub fn generate() -> Result<TokenKey, aws_lc_rs::error::Unspecified> {
        let secret = random_secret().ok_or(aws_lc_rs::error::Unspecified)?;
        Ok(TokenKey::from_ring(KeyRing::single(i64::MIN, secret)))
    }

    /// Tokens signed and checked with `ring`.
    pub fn from_ring(ring: KeyRing) -> TokenKey {
        TokenKey {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
            departed: Arc::default(),
        }
    }

    fn ring(&self) -> Arc<KeyRing> {
        Arc::clone(&self.current())
    }

    /// The keys, read-locked: for a token's one HMAC, without touching the ring's reference
    /// count, which every request would share between the runtime's threads.
    fn current(&self) -> std::sync::RwLockReadGuard<'_, Arc<KeyRing>> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `ring` in use at `now`. Keys of the old ring that still verify and are not in
    /// `ring` keep verifying for the longest TTL: their tokens stay good, as SDKs expect
    /// (aws-config sends a refused token again until its TTL ends).
    fn replace(&self, ring: KeyRing, now: i64) {
        // The departing keys are added before the ring is swapped: a token checked between
        // the two finds its key in one place or the other.
        let old = self.ring();
        let mut departed = self.departed.write().unwrap_or_else(|e| e.into_inner());
        departed.retain(|(key, until)| {
            *until >= now && !ring.keys().any(|kept| kept.secret == key.secret)
        });
        for key in old.verifying(now) {
            let known = |k: &Key| k.secret == key.secret;
            if !ring.keys().any(known) && !departed.iter().any(|(k, _)| known(k)) {
                departed.push((key.clone(), now.saturating_add(MAX_TTL_SECS)));
            }
        }
        let excess = departed.len().saturating_sub(MAX_DEPARTED);
        departed.drain(..excess);
        drop(departed);
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
    }

    /// Whether a departed key that still verifies at `now` signed `claim` with `tag`.
    fn departed_signed(&self, claim: &[u8], tag: &[u8], now: i64) -> bool {
        self.departed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            // Through `until` itself, as a token is good through its expiry's second.
            .any(|(key, until)| *until >= now && key.verifies(claim, tag))
    }

    /// A token for the pod `uid` at `ip`, valid until `now + ttl_secs`, signed with the
    /// key that signs at `now`.
    pub fn issue(&self, ip: IpAddr, uid: &str, now: i64, ttl_secs: u64) -> String {
        let mut claim = String::with_capacity(CLAIM_BYTES);
        push_ip(&mut claim, ip);
        claim.push('|');
        claim.push_str(uid);
        claim.push('|');
        claim.push_str(itoa::Buffer::new().format(now.saturating_add(ttl_secs as i64)));
        let tag = self.current().signing(now).sign(claim.as_bytes());
        // One allocation for the token: both parts encoded into it.
        let mut token = String::with_capacity(claim.len() * 4 / 3 + 4 + 1 + TAG_BASE64_BYTES);
        URL_SAFE_NO_PAD.encode_string(claim.as_bytes(), &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        token
    }

    /// Checks that `token` was signed by a key that still verifies at `now`, issued to
    /// `ip` and — when both are known — to the pod `uid`, and that it has not expired.
    pub fn validate(
        &self,
        token: &str,
        ip: IpAddr,
        uid: Option<&str>,
        now: i64,
    ) -> Result<(), TokenError> {
        let (claim, tag) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
        // Decoded on the stack: every request with a token comes here. Only a claim longer
        // than any this agent issues (never valid, but it must be refused for the right
        // reason) or a tag longer than a signature takes the heap.
        let (mut claim_buf, mut tag_buf) = ([0u8; CLAIM_BYTES], [0u8; 2 * TAG_BYTES]);
        let claim = decode_into(claim, &mut claim_buf)?;
        let tag = decode_into(tag, &mut tag_buf)?;
        if !self
            .current()
            .verifying(now)
            .any(|key| key.verifies(&claim, &tag))
            && !self.departed_signed(&claim, &tag, now)
        {
            return Err(TokenError::BadSignature);
        }
        let claim = std::str::from_utf8(&claim).map_err(|_| TokenError::Malformed)?;
        let mut parts = claim.splitn(3, '|');
        let (Some(owner), Some(owner_uid), Some(expiry)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let owner: IpAddr = owner.parse().map_err(|_| TokenError::Malformed)?;
        if owner != ip {
            return Err(TokenError::WrongAddress);
        }
        if let Some(uid) = uid
            && !owner_uid.is_empty()
            && owner_uid != uid
        {
            return Err(TokenError::WrongPod);
        }
        let expiry: i64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        // Good through its last whole second: `now` is whole seconds, rounded down, and a
        // client counts the TTL from when it got the token, up to a second after `now` was
        // read. Ending at `expiry` itself would refuse a token up to a second before the
        // client expects, and some use theirs to the last moment and never retry a 401.
        if now > expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// `ip` as text, as its `Display` writes it, onto `out`: an IPv4 address without the
/// formatting machinery (every pod's token request formats one).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(itoa::Buffer::new().format(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            // Writing to a String cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

/// `encoded` (unpadded URL-safe base64) decoded into `buf`, or onto the heap when it does
/// not fit there; not base64 at all: malformed.
fn decode_into<'a>(
    encoded: &str,
    buf: &'a mut [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, TokenError> {
    match URL_SAFE_NO_PAD.decode_slice(encoded, buf) {
        Ok(n) => Ok(std::borrow::Cow::Borrowed(&buf[..n])),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => URL_SAFE_NO_PAD
            .decode(encoded)
            .map(std::borrow::Cow::Owned)
            .map_err(|_| TokenError::Malformed),
        Err(base64::DecodeSliceError::DecodeError(_)) => Err(TokenError::Malformed),
    }
}

/// The key file on the node: read, created and replaced atomically, mode 0600.
#[derive(Clone, Debug)]
pub struct KeyFile {
    path: PathBuf,
}

/// What [`KeyFile::create`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    /// This agent's keys are the file's.
    Written,
    /// Another agent created the file first: read it.
    Exists,
}

impl KeyFile {
    pub fn new(path: &Path) -> KeyFile {
        KeyFile {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's keys. A file others may read is made 0600 (and logged).
    pub fn read(&self) -> Result<KeyRing, KeyFileError> {
        let path = self.path.clone();
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyFileError::Missing { path });
            }
            Err(source) => return Err(KeyFileError::Read { path, source }),
        };
        let metadata = file.metadata().map_err(|source| KeyFileError::Read {
            path: path.clone(),
            source,
        })?;
        if !metadata.is_file() {
            return Err(KeyFileError::Corrupt {
                path,
                why: "not a regular file".into(),
            });
        }
        if metadata.permissions().mode() & 0o077 != 0 {
            let mode = metadata.permissions().mode() & 0o777;
            match file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "the token key file was readable by others; made it 0600"
                ),
                Err(error) => tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    %error,
                    "the token key file is readable by others and could not be made 0600"
                ),
            }
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(&file, MAX_FILE_BYTES), &mut text)
            .map_err(|source| match source.kind() {
            std::io::ErrorKind::InvalidData => KeyFileError::Corrupt {
                path: path.clone(),
                why: "not UTF-8 text".into(),
            },
            _ => KeyFileError::Read {
                path: path.clone(),
                source,
            },
        })?;
        KeyRing::parse(&text).map_err(|why| KeyFileError::Corrupt { path, why })
    }

    /// Writes `ring` to a new temporary file beside the key file (0600, synced) and hands
    /// its path to `place`; the temporary file is removed whatever happens.
    fn with_temporary<T>(
        &self,
        ring: &KeyRing,
        place: impl FnOnce(&Path) -> std::io::Result<T>,
    ) -> Result<T, KeyFileError> {
        let write_error = |source| KeyFileError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(write_error)?;
        }
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keys".into());
        let temporary = dir.join(format!(
            ".{name}.{}.{:016x}.tmp",
            std::process::id(),
            fastrand::u64(..)
        ));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(ring.render().as_bytes())?;
            file.sync_all()?;
            place(&temporary)
        })();
        let _ = std::fs::remove_file(&temporary);
        let placed = written.map_err(write_error)?;
        // The rename or link is durable once the directory is synced (best effort).
        if let Ok(dir) = std::fs::File::open(&dir) {
            let _ = dir.sync_all();
        }
        Ok(placed)
    }

    /// Creates the file with `ring`'s keys unless it exists (then another agent was first).
    pub fn create(&self, ring: &KeyRing) -> Result<Created, KeyFileError> {
        self.with_temporary(ring, |temporary| {
            match std::fs::hard_link(temporary, &self.path) {
                Ok(()) => Ok(Created::Written),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Created::Exists),
                Err(e) => Err(e),
            }
        })
    }

    /// Replaces the file with `ring`'s keys in one step.
    pub fn replace(&self, ring: &KeyRing) -> Result<(), KeyFileError> {
        self.with_temporary(ring, |temporary| std::fs::rename(temporary, &self.path))
    }
}

/// Where the keys in use come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Nothing loaded yet.
    Nothing,
    /// The key file.
    File,
    /// This process alone (the file could not be used).
    Process,
}

/// Keeps a [`TokenKey`]'s keys in step with the key file: reads it, rotates the keys when due
/// and writes them back. See the module documentation for what happens when it cannot.
pub struct KeyKeeper {
    file: KeyFile,
    key: TokenKey,
    source: Source,
    random: Box<dyn FnMut() -> Option<[u8; KEY_BYTES]> + Send>,
}

impl std::fmt::Debug for KeyKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyKeeper")
            .field("file", &self.file)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl KeyKeeper {
    /// Loads (or creates) the keys of `path` at `now` and returns the token key serving them
    /// with the keeper that keeps them current. Fails only when the file has no keys to give
    /// and the system's random generator cannot draw one (see the module documentation).
    pub fn open(path: &Path, now: i64) -> Result<(TokenKey, KeyKeeper), KeyFileError> {
        KeyKeeper::open_with(path, now, Box::new(random_secret))
    }

    /// [`KeyKeeper::open`] with the secrets of new keys drawn from `random` (tests).
    pub fn open_with(
        path: &Path,
        now: i64,
        mut random: Box<dyn FnMut() -> Option<[u8; KEY_BYTES]> + Send>,
    ) -> Result<(TokenKey, KeyKeeper), KeyFileError> {
        let file = KeyFile::new(path);
        // The file's keys if it has any, else new ones ([`KeyKeeper::refresh`] decides what
        // to do with the file).
        let initial = match file.read() {
            Ok(ring) => ring,
            Err(_) => KeyRing::fresh(now, random().ok_or(KeyFileError::Random)?),
        };
        let key = TokenKey::from_ring(initial);
        let mut keeper = KeyKeeper {
            file,
            key: key.clone(),
            source: Source::Nothing,
            random,
        };
        keeper.refresh(now);
        Ok((key, keeper))
    }

    /// Whether the keys in use are the file's.
    pub fn uses_file(&self) -> bool {
        self.source == Source::File
    }

    /// One round: read the file, rotate when due, write back; adopt the file's keys, or keep
    /// this process's keys when the file cannot be used.
    pub fn refresh(&mut self, now: i64) {
        let path = self.file.path().display().to_string();
        match self.file.read() {
            Ok(ring) => {
                let ring = match ring.maintain(now, &mut *self.random) {
                    None => ring,
                    Some(rotated) => match self.file.replace(&rotated) {
                        Ok(()) => {
                            log_rotation(&path, &ring, &rotated, now);
                            rotated
                        }
                        Err(error) => {
                            // Keep the file's keys: every agent must sign with the same one.
                            tracing::error!(path, error = %error_chain(&error), "could not write the rotated token keys; the current keys stay in use");
                            ring
                        }
                    },
                };
                self.adopt(ring, Source::File, &path, now);
            }
            Err(KeyFileError::Missing { .. }) => {
                let ring = self.maintained(now);
                match self.file.create(&ring) {
                    Ok(Created::Written) => {
                        tracing::info!(
                            path,
                            "token keys written to the node: tokens outlive this agent"
                        );
                        self.adopt(ring, Source::File, &path, now);
                    }
                    // Another agent was first: its keys are the node's.
                    Ok(Created::Exists) => match self.file.read() {
                        Ok(ring) => self.adopt(ring, Source::File, &path, now),
                        Err(error) => self.keep_own(ring, &error, &path, now),
                    },
                    Err(error) => self.keep_own(ring, &error, &path, now),
                }
            }
            Err(error @ KeyFileError::Corrupt { .. }) => {
                let ring = self.maintained(now);
                tracing::error!(path, error = %error_chain(&error), "the token key file is corrupt; replacing it with this agent's keys (tokens signed by keys only that file held are refused)");
                match self.file.replace(&ring) {
                    Ok(()) => self.adopt(ring, Source::File, &path, now),
                    Err(error) => self.keep_own(ring, &error, &path, now),
                }
            }
            Err(error) => {
                let ring = self.maintained(now);
                self.keep_own(ring, &error, &path, now);
            }
        }
    }

    /// The keys in use, rotated as due at `now`.
    fn maintained(&mut self, now: i64) -> KeyRing {
        let ring = self.key.ring();
        ring.maintain(now, &mut *self.random)
            .unwrap_or_else(|| (*ring).clone())
    }

    fn adopt(&mut self, ring: KeyRing, source: Source, path: &str, now: i64) {
        if self.source == Source::Process {
            tracing::warn!(
                path,
                "the token key file is usable again; its keys replace this process's, which still verify the tokens they signed"
            );
        } else if self.source == Source::Nothing {
            tracing::info!(path, schedule = ?ring.schedule(), "token keys in use (signs from, retires at)");
        }
        if !self.key.ring().same_as(&ring) {
            self.key.replace(ring, now);
        }
        self.source = source;
    }

    /// The file cannot be used: sign with this process's keys (logged once per outage).
    fn keep_own(&mut self, ring: KeyRing, error: &KeyFileError, path: &str, now: i64) {
        if self.source != Source::Process {
            tracing::error!(path, error = %error_chain(error), "cannot use the token key file; signing IMDSv2 tokens with keys of this process alone (tokens will not survive its restart); the file is tried again every {}s", KEY_RELOAD_INTERVAL.as_secs());
        }
        if !self.key.ring().same_as(&ring) {
            self.key.replace(ring, now);
        }
        self.source = Source::Process;
    }

    /// Refreshes every [`KEY_RELOAD_INTERVAL`] until `stop`.
    pub async fn follow(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(KEY_RELOAD_INTERVAL) => {}
            }
            self.refresh(podiam_runtime::clock::now_unix());
        }
    }
}

fn log_rotation(path: &str, before: &KeyRing, after: &KeyRing, now: i64) {
    let staged = after
        .keys()
        .filter(|k| k.from > now && !before.keys().any(|b| b.from == k.from))
        .map(|k| k.from)
        .next();
    match staged {
        Some(from) => tracing::info!(
            path,
            signs_from = from,
            "new token key staged; the current key verifies for {}s after that",
            KEY_GRACE
        ),
        None => tracing::info!(path, "retired token keys removed"),
    }
}

/// An error with its sources, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` header value: decimal digits only (no
/// sign, no spaces inside), within [`TTL_RANGE`].
pub fn parse_ttl(value: Option<&str>) -> Option<u64> {
    let value = value?.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u64>().ok().filter(|t| TTL_RANGE.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    /// Secrets 1, 2, 3… (each byte the same), so tests can tell keys apart.
    fn counter(start: u8) -> Box<dyn FnMut() -> Option<[u8; KEY_BYTES]> + Send> {
        let mut next = start;
        Box::new(move || {
            next = next.wrapping_add(1);
            Some([next; KEY_BYTES])
        })
    }

    fn ring_at(now: i64) -> KeyRing {
        KeyRing::fresh(now, [7; KEY_BYTES])
    }

    #[test]
    fn tokens_bind_to_address_pod_and_time() {
        let key = TokenKey::generate().expect("key");
        let a = ip("10.0.0.1");
        let b = ip("10.0.0.2");
        let token = key.issue(a, "uid-a", 1000, 60);
        // The clock is injected: validity is checked against the given `now`.
        assert_eq!(key.validate(&token, a, Some("uid-a"), 1000), Ok(()));
        assert_eq!(key.validate(&token, a, Some("uid-a"), 1060), Ok(()));
        assert_eq!(
            key.validate(&token, a, Some("uid-a"), 1061),
            Err(TokenError::Expired)
        );
        assert_eq!(
            key.validate(&token, b, Some("uid-a"), 1000),
            Err(TokenError::WrongAddress)
        );
        // A new pod on the same IP (another UID) cannot use it.
        assert_eq!(
            key.validate(&token, a, Some("uid-new"), 1000),
            Err(TokenError::WrongPod)
        );
        // With no pod table, the IP alone is checked.
        assert_eq!(key.validate(&token, a, None, 1000), Ok(()));
        // A token issued without a UID is bound to the IP alone.
        let ip_only = key.issue(a, "", 1000, 60);
        assert_eq!(key.validate(&ip_only, a, Some("uid-a"), 1000), Ok(()));
        let other = TokenKey::generate().expect("key");
        assert_eq!(
            other.validate(&token, a, Some("uid-a"), 1000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key.validate("garbage", a, None, 1000),
            Err(TokenError::Malformed)
        );
        // Tampering with the claim breaks the signature.
        let (_, tag) = token.split_once('.').expect("dot");
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(b"10.0.0.1|uid-a|99999999")
        );
        assert_eq!(
            key.validate(&forged, a, Some("uid-a"), 1000),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn addresses_are_written_as_their_display_writes_them() {
        for text in [
            "0.0.0.0",
            "10.0.0.1",
            "255.255.255.255",
            "192.168.100.7",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            let mut out = String::from("x");
            push_ip(&mut out, ip(text));
            assert_eq!(out, format!("x{}", ip(text)));
        }
    }

    /// Tokens outlive the agent process (the key file), so an agent must accept what an older
    /// or newer build signed: the tag is plain HMAC-SHA256 of the claim, checked here against
    /// another implementation (aws-lc's) and against RFC 4231's test case 2.
    #[test]
    fn the_tag_is_standard_hmac_sha256_of_the_claim() {
        use aws_lc_rs::hmac as lc;
        let secret = [42u8; KEY_BYTES];
        let key = TokenKey::from_ring(KeyRing::single(i64::MIN, secret));
        let lc_key = lc::Key::new(lc::HMAC_SHA256, &secret);
        for (peer, uid) in [("10.0.0.1", "uid-a"), ("fd00::1", ""), ("10.0.0.2", "u")] {
            let token = key.issue(ip(peer), uid, 1000, 60);
            let (claim, tag) = token.split_once('.').expect("dot");
            let claim = URL_SAFE_NO_PAD.decode(claim).expect("claim");
            assert_eq!(claim, format!("{peer}|{uid}|1060").as_bytes());
            let tag = URL_SAFE_NO_PAD.decode(tag).expect("tag");
            assert_eq!(tag, lc::sign(&lc_key, &claim).as_ref());
            // A token another implementation signed is accepted; its tag cut short is not.
            let theirs = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(&claim),
                URL_SAFE_NO_PAD.encode(lc::sign(&lc_key, &claim))
            );
            assert_eq!(key.validate(&theirs, ip(peer), Some(uid), 1000), Ok(()));
            let short = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(&claim),
                URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES - 1])
            );
            assert_eq!(
                key.validate(&short, ip(peer), Some(uid), 1000),
                Err(TokenError::BadSignature)
            );
        }
        // RFC 4231, test case 2: a key shorter than the block, padded as ours are.
        let jefe = Key::new(0, {
            let mut k = [0u8; KEY_BYTES];
            k[..4].copy_from_slice(b"Jefe");
            k
        });
        let expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let got: String = jefe
            .sign(b"what do ya want for nothing?")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn tokens_of_any_size_are_judged_the_same_on_and_off_the_stack() {
        let key = TokenKey::generate().expect("key");
        let v6 = ip("fd00:1234:5678:9abc:def0:1234:5678:9abc");
        // The longest claim the agent issues (an IPv6 address, a pod UID) decodes on the
        // stack; a far longer one (a UID no API server gives) is still judged, on the heap.
        for uid in [
            "0b5f2c3e-8d7a-4c1b-9e6f-2a3b4c5d6e7f".to_string(),
            "u".repeat(1000),
        ] {
            let token = key.issue(v6, &uid, 1000, 21600);
            assert_eq!(key.validate(&token, v6, Some(&uid), 1000), Ok(()));
            assert_eq!(
                key.validate(&token, v6, Some("other"), 1000),
                Err(TokenError::WrongPod)
            );
            // A tag longer than any signature is a bad signature, whatever its length.
            let (claim, tag) = token.split_once('.').expect("dot");
            for extra in [1, 200] {
                let mut long_tag = URL_SAFE_NO_PAD.decode(tag).expect("tag");
                long_tag.extend(std::iter::repeat_n(0u8, extra));
                let long = format!("{claim}.{}", URL_SAFE_NO_PAD.encode(&long_tag));
                assert_eq!(
                    key.validate(&long, v6, Some(&uid), 1000),
                    Err(TokenError::BadSignature)
                );
            }
            // Not base64: malformed, short or long.
            let bad = format!("{claim}!.{tag}");
            assert_eq!(
                key.validate(&bad, v6, Some(&uid), 1000),
                Err(TokenError::Malformed)
            );
        }
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl(Some("21600")), Some(21600));
        assert_eq!(parse_ttl(Some("1")), Some(1));
        assert_eq!(parse_ttl(Some("0")), None);
        assert_eq!(parse_ttl(Some("21601")), None);
        assert_eq!(parse_ttl(Some("-5")), None);
        assert_eq!(parse_ttl(Some("abc")), None);
        assert_eq!(parse_ttl(Some("+60")), None);
        assert_eq!(parse_ttl(Some("6 0")), None);
        assert_eq!(parse_ttl(Some("")), None);
        assert_eq!(parse_ttl(Some("99999999999999999999999")), None);
        assert_eq!(parse_ttl(None), None);
        assert_eq!(*TTL_RANGE.end() as i64, MAX_TTL_SECS);
    }

    #[test]
    fn the_next_key_is_staged_ahead_signs_for_a_period_and_the_last_one_verifies_for_the_grace() {
        let mut fresh = counter(100);
        let first = ring_at(T0);
        let due = T0 + KEY_PERIOD - KEY_LEAD;
        assert!(
            first.maintain(T0, &mut *fresh).is_none(),
            "nothing due at once"
        );
        assert!(first.maintain(due - 1, &mut *fresh).is_none());
        let two = first
            .maintain(due, &mut *fresh)
            .expect("the next key staged");
        assert_eq!(
            two.schedule(),
            vec![
                (T0, Some(T0 + KEY_PERIOD + KEY_GRACE)),
                (T0 + KEY_PERIOD, None)
            ]
        );
        // Staged once: the next reads change nothing until the old key retires.
        assert!(two.maintain(due + 30, &mut *fresh).is_none());
        assert!(two.maintain(T0 + KEY_PERIOD, &mut *fresh).is_none());

        let key = TokenKey::from_ring(two.clone());
        let pod = ip("10.0.0.1");
        // The last token of the old key, with the longest TTL, and the first of the new one.
        let last_old = key.issue(pod, "uid", T0 + KEY_PERIOD - 1, 21600);
        let first_new = key.issue(pod, "uid", T0 + KEY_PERIOD, 21600);
        assert_ne!(
            last_old.split_once('.').map(|p| p.1),
            first_new.split_once('.').map(|p| p.1),
            "another key signs from its time"
        );
        let old_only = TokenKey::from_ring(first.clone());
        assert_eq!(
            old_only.validate(&first_new, pod, Some("uid"), T0 + KEY_PERIOD),
            Err(TokenError::BadSignature)
        );
        // The old key's last token lives its whole TTL, through its last second.
        let end = T0 + KEY_PERIOD - 1 + 21600;
        assert_eq!(key.validate(&last_old, pod, Some("uid"), end), Ok(()));
        // The next second it is refused: its key retires that very second.
        assert_eq!(end + 1, T0 + KEY_PERIOD + KEY_GRACE);
        assert_eq!(
            key.validate(&last_old, pod, Some("uid"), end + 1),
            Err(TokenError::BadSignature)
        );

        // After the grace the old key is dropped, and anything it signed is refused even if
        // it claimed a longer life.
        let retired_at = T0 + KEY_PERIOD + KEY_GRACE;
        let long = key.issue(pod, "uid", T0 + KEY_PERIOD - 1, 10 * 21600);
        assert_eq!(
            key.validate(&long, pod, Some("uid"), retired_at - 1),
            Ok(())
        );
        assert_eq!(
            key.validate(&long, pod, Some("uid"), retired_at),
            Err(TokenError::BadSignature)
        );
        let one = two
            .maintain(retired_at - KEY_LEAD, &mut *fresh)
            .expect("the third key staged as the first retires");
        assert_eq!(one.schedule().len(), 3, "previous, current and next");
        let after = one
            .maintain(retired_at, &mut *fresh)
            .expect("first retired");
        assert_eq!(
            after.schedule().iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![T0 + KEY_PERIOD, T0 + 2 * KEY_PERIOD]
        );
    }

    #[test]
    fn every_token_verifies_until_it_expires_through_a_week_of_rotations() {
        let mut fresh = counter(0);
        let mut ring = ring_at(T0);
        let pod = ip("10.0.0.9");
        let mut tokens: Vec<(String, i64)> = Vec::new();
        let mut most_keys = 0;
        let mut now = T0;
        while now < T0 + 7 * 86_400 {
            if let Some(next) = ring.maintain(now, &mut *fresh) {
                ring = next;
            }
            most_keys = most_keys.max(ring.schedule().len());
            let key = TokenKey::from_ring(ring.clone());
            tokens.push((key.issue(pod, "uid", now, 21600), now + 21600));
            for (token, expiry) in &tokens {
                let verdict = key.validate(token, pod, Some("uid"), now);
                if now <= *expiry {
                    assert_eq!(verdict, Ok(()), "at {} a token to {expiry}", now - T0);
                }
            }
            tokens.retain(|(_, expiry)| *expiry >= now);
            now += KEY_RELOAD_INTERVAL.as_secs() as i64 * 7;
        }
        assert_eq!(most_keys, 3, "previous, current and next at most");
    }

    #[test]
    fn a_key_overdue_after_a_long_outage_is_replaced_after_the_lead() {
        let mut fresh = counter(0);
        let week_later = T0 + 7 * 86_400;
        let ring = ring_at(T0)
            .maintain(week_later, &mut *fresh)
            .expect("rotation due");
        assert_eq!(
            ring.schedule(),
            vec![
                (T0, Some(week_later + KEY_LEAD + KEY_GRACE)),
                (week_later + KEY_LEAD, None)
            ],
            "agents that read the file late still learn the key before it signs"
        );
    }

    #[test]
    fn a_clock_gone_back_signs_with_the_oldest_key() {
        let ring = ring_at(T0);
        let key = TokenKey::from_ring(ring.clone());
        let token = key.issue(ip("10.0.0.1"), "uid", T0 - 3600, 60);
        assert_eq!(
            key.validate(&token, ip("10.0.0.1"), None, T0 - 3600),
            Ok(())
        );
        assert!(ring.maintain(T0 - 3600, &mut *counter(0)).is_none());
    }

    #[test]
    fn the_file_format_round_trips_and_damage_is_named_without_keys() {
        let ring = ring_at(T0)
            .maintain(T0 + KEY_PERIOD, &mut *counter(40))
            .expect("two keys");
        let text = ring.render();
        assert!(text.starts_with("podiam imds-token-keys v1\n"), "{text}");
        assert!(KeyRing::parse(&text).expect("parses").same_as(&ring));
        let secret = URL_SAFE_NO_PAD.encode([7u8; KEY_BYTES]);
        for (bad, why) in [
            ("", "first line"),
            ("something else\n", "first line"),
            ("podiam imds-token-keys v1\n", "no key"),
            ("podiam imds-token-keys v1\n12 short\n", "32-byte"),
            ("podiam imds-token-keys v1\nnot-a-time KEY\n", "Unix time"),
            ("podiam imds-token-keys v1\njustone\n", "FROM KEY"),
        ] {
            let error = KeyRing::parse(bad).expect_err(bad);
            assert!(error.contains(why), "{bad:?}: {error}");
        }
        let twice = format!("podiam imds-token-keys v1\n5 {secret}\n5 {secret}\n");
        assert!(
            KeyRing::parse(&twice)
                .expect_err("dup")
                .contains("two keys")
        );
        let many: String = (0..20).map(|i| format!("{i} {secret}\n")).collect();
        let many = format!("podiam imds-token-keys v1\n{many}");
        assert!(
            KeyRing::parse(&many)
                .expect_err("many")
                .contains("more than")
        );
        // Errors never carry a key.
        let wrong = format!("podiam imds-token-keys v1\nx{secret}\n");
        assert!(!KeyRing::parse(&wrong).expect_err("bad").contains(&secret));
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let ring = ring_at(T0);
        let secret = URL_SAFE_NO_PAD.encode([7u8; KEY_BYTES]);
        let dir = tempfile::tempdir().expect("dir");
        let (key, keeper) =
            KeyKeeper::open_with(&dir.path().join("keys"), T0, counter(6)).expect("opens");
        for shown in [
            format!("{ring:?}"),
            format!("{key:?}"),
            format!("{keeper:?}"),
            format!("{:?}", TokenKey::from_ring(ring.clone())),
        ] {
            assert!(!shown.contains(&secret), "{shown}");
            assert!(!shown.contains("[7, 7"), "{shown}");
        }
        assert!(format!("{ring:?}").contains("<redacted>"));
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_restarted_agent_accepts_the_tokens_of_the_one_before_with_their_binding() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("node").join("imds-token-keys");
        let (before, keeper) = KeyKeeper::open_with(&path, T0, counter(0)).expect("opens");
        assert!(keeper.uses_file());
        assert_eq!(mode(&path), 0o600, "only the agent reads the keys");
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        let pod = ip("10.0.0.1");
        let token = before.issue(pod, "uid-a", T0, 21600);
        drop((before, keeper));

        // The next process (a restart, or the successor of a rolling update) draws other
        // secrets but reads the node's.
        let (after, keeper) =
            KeyKeeper::open_with(&path, T0 + 60, counter(200)).expect("opens again");
        assert!(keeper.uses_file());
        assert_eq!(after.validate(&token, pod, Some("uid-a"), T0 + 60), Ok(()));
        assert_eq!(
            after.validate(&token, pod, Some("uid-b"), T0 + 60),
            Err(TokenError::WrongPod),
            "still bound to its pod"
        );
        assert_eq!(
            after.validate(&token, ip("10.0.0.2"), None, T0 + 60),
            Err(TokenError::WrongAddress)
        );
        // Both sign alike: a token of either is good in the other.
        let (beside, _keeper) = KeyKeeper::open_with(&path, T0 + 61, counter(99)).expect("opens");
        let again = after.issue(pod, "uid-a", T0 + 61, 60);
        assert_eq!(beside.validate(&again, pod, Some("uid-a"), T0 + 61), Ok(()));
    }

    #[test]
    fn a_new_file_is_created_once_by_the_first_agent() {
        let dir = tempfile::tempdir().expect("dir");
        let file = KeyFile::new(&dir.path().join("keys"));
        assert!(matches!(file.read(), Err(KeyFileError::Missing { .. })));
        let first = ring_at(T0);
        let second = KeyRing::fresh(T0, [9; KEY_BYTES]);
        assert_eq!(file.create(&first).expect("creates"), Created::Written);
        assert_eq!(file.create(&second).expect("answers"), Created::Exists);
        assert!(
            file.read().expect("reads").same_as(&first),
            "the first one stays"
        );
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keys")]);
    }

    #[test]
    fn a_corrupt_file_is_replaced_and_an_open_one_closed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys");
        std::fs::write(&path, "podiam imds-token-keys v1\n12 not-a-key\n").expect("write");
        let (key, keeper) = KeyKeeper::open_with(&path, T0, counter(0)).expect("opens");
        assert!(keeper.uses_file(), "replaced with new keys");
        let ring = KeyFile::new(&path).read().expect("now a key file");
        let token = key.issue(ip("10.0.0.1"), "u", T0, 60);
        assert_eq!(
            TokenKey::from_ring(ring).validate(&token, ip("10.0.0.1"), None, T0),
            Ok(())
        );

        // A good file that others may read is kept, and made 0600.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let (again, _) = KeyKeeper::open_with(&path, T0 + 1, counter(50)).expect("opens");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(again.validate(&token, ip("10.0.0.1"), None, T0 + 1), Ok(()));
    }

    #[test]
    fn an_unusable_file_leaves_the_agent_signing_with_its_own_keys() {
        let dir = tempfile::tempdir().expect("dir");
        let not_a_dir = dir.path().join("plain");
        std::fs::write(&not_a_dir, "x").expect("write");
        let path = not_a_dir.join("keys");
        let (key, mut keeper) = KeyKeeper::open_with(&path, T0, counter(0)).expect("opens");
        assert!(!keeper.uses_file());
        let pod = ip("10.0.0.1");
        let token = key.issue(pod, "u", T0, 60);
        assert_eq!(key.validate(&token, pod, Some("u"), T0), Ok(()));
        // Its own keys rotate too.
        keeper.refresh(T0 + KEY_PERIOD);
        assert_eq!(key.ring().schedule().len(), 2);
        assert!(!keeper.uses_file());
        // No random generator and no file: the agent cannot sign at all, and says so.
        let none: Box<dyn FnMut() -> Option<[u8; KEY_BYTES]> + Send> = Box::new(|| None);
        assert!(matches!(
            KeyKeeper::open_with(&path, T0, none),
            Err(KeyFileError::Random)
        ));
    }

    #[test]
    fn tokens_of_the_process_keys_stay_good_once_the_file_is_usable_again() {
        let dir = tempfile::tempdir().expect("dir");
        let parent = dir.path().join("keys.d");
        std::fs::write(&parent, "x").expect("write");
        let path = parent.join("keys");
        let (key, mut keeper) = KeyKeeper::open_with(&path, T0, counter(0)).expect("opens");
        assert!(!keeper.uses_file());
        let pod = ip("10.0.0.1");
        let token = key.issue(pod, "u", T0, 21600);
        // The directory appears, and another agent of the node writes the file first.
        std::fs::remove_file(&parent).expect("rm");
        std::fs::create_dir(&parent).expect("mkdir");
        let (other, _) = KeyKeeper::open_with(&path, T0 + 10, counter(100)).expect("other");
        keeper.refresh(T0 + 30);
        assert!(keeper.uses_file());
        let theirs = other.issue(pod, "u", T0 + 30, 60);
        assert_eq!(key.validate(&theirs, pod, Some("u"), T0 + 30), Ok(()));
        assert_eq!(
            key.issue(pod, "u", T0 + 30, 60),
            theirs,
            "the file's key signs"
        );
        // A token of this process's key is good for its whole TTL (aws-config would send it
        // again and again until then).
        assert_eq!(key.validate(&token, pod, Some("u"), T0 + 21600), Ok(()));
        assert_eq!(
            other.validate(&token, pod, Some("u"), T0 + 30),
            Err(TokenError::BadSignature),
            "only where it was issued"
        );
        keeper.refresh(T0 + 30 + 2 * KEY_RELOAD_INTERVAL.as_secs() as i64);
        assert_eq!(key.validate(&token, pod, Some("u"), T0 + 21600), Ok(()));
        // The process's keys go once the longest TTL has passed; the file's key, just
        // replaced, takes their place.
        let later = T0 + 30 + MAX_TTL_SECS + 1;
        key.replace(KeyRing::fresh(later, [9; KEY_BYTES]), later);
        let departed = key.departed.read().expect("lock");
        assert_eq!(departed.len(), 1);
        assert_eq!(departed[0].1, later + MAX_TTL_SECS);
    }

    #[test]
    fn agents_sharing_a_file_rotate_together() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keys");
        let (old, mut old_keeper) = KeyKeeper::open_with(&path, T0, counter(0)).expect("old");
        let (new, mut new_keeper) = KeyKeeper::open_with(&path, T0 + 5, counter(100)).expect("new");
        // Both stage a next key at the same moment, with different secrets (each read the file
        // before the other wrote: the file is put back as both read it): the last write wins,
        // and the other agent adopts it at its next read, long before the key signs.
        let due = T0 + KEY_PERIOD - KEY_LEAD;
        let as_read = std::fs::read(&path).expect("read");
        old_keeper.refresh(due);
        let staged_by_old = std::fs::read(&path).expect("read");
        std::fs::write(&path, &as_read).expect("write");
        new_keeper.refresh(due);
        assert_ne!(std::fs::read(&path).expect("read"), staged_by_old);
        old_keeper.refresh(due + KEY_RELOAD_INTERVAL.as_secs() as i64);
        let switch = T0 + KEY_PERIOD;
        let pod = ip("10.0.0.3");
        let by_old = old.issue(pod, "u", switch, 60);
        let by_new = new.issue(pod, "u", switch, 60);
        assert_eq!(by_old, by_new, "the same key signs in both");
        assert_eq!(new.validate(&by_old, pod, Some("u"), switch), Ok(()));
        assert_eq!(
            KeyFile::new(&path).read().expect("file").schedule().len(),
            2
        );
    }
}
