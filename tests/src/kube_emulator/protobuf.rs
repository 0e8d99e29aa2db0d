//! Decoding the Kubernetes protobuf request bodies that kubectl's typed clients send, into
//! the JSON form the rest of the emulator works with. Pure functions, table-driven tests.
//!
//! `kubectl create serviceaccount|role|rolebinding|clusterrole|clusterrolebinding|namespace`,
//! `kubectl create token` and `kubectl auth can-i` build typed objects and POST them with
//! `Content-Type: application/vnd.kubernetes.protobuf` (while accepting JSON back, which
//! the emulator answers with). Such a body is the four bytes `k8s\0` and then a
//! `runtime.Unknown` envelope: `typeMeta` (1: {1: apiVersion, 2: kind}), `raw` (2: the
//! object's own message), `contentEncoding` (3), `contentType` (4).
//!
//! Each supported type is described by a small schema ([`Field`] tables below, field
//! numbers as in the Kubernetes API's protobuf definitions); fields not in a schema are
//! skipped. The Go encoder writes every non-pointer field, empty or not, so empty strings,
//! zero numbers, zero timestamps and empty messages are dropped, as the
//! JSON encoder's `omitempty` would; fields that are pointers in Go (`OptInt`, `OptBool`)
//! are kept whenever present.

use serde_json::{Map, Value, json};

use super::clock::format_rfc3339;

/// The prefix of every Kubernetes protobuf body.
pub const MAGIC: &[u8; 4] = b"k8s\0";

/// The media type of Kubernetes protobuf bodies.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// A body that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtobufError {
    /// The body does not start with `k8s\0`.
    #[error("the protobuf body does not start with the Kubernetes magic bytes")]
    NoMagic,
    /// The wire format is broken (truncated, bad varint, unsupported wire type).
    #[error("malformed protobuf: {0}")]
    Malformed(&'static str),
    /// The envelope names a type the emulator has no schema for.
    #[error(
        "the emulator does not decode protobuf bodies of {api_version} {kind}; send JSON \
         (kubectl create -f / apply -f) instead"
    )]
    UnknownType {
        /// The envelope's apiVersion.
        api_version: String,
        /// The envelope's kind.
        kind: String,
    },
}

/// How a field's value is encoded and shown.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// A string; dropped when empty.
    Str,
    /// A varint integer; dropped when zero.
    Int,
    /// A varint integer that is a pointer in Go: kept when present.
    OptInt,
    /// A boolean that is a pointer in Go: kept when present.
    OptBool,
    /// `meta.v1.Time` {1: seconds, 2: nanos}, as RFC 3339; dropped when zero.
    Time,
    /// A nested message; dropped when empty.
    Msg(&'static [Field]),
    /// A repeated string.
    Strs,
    /// A repeated message.
    Msgs(&'static [Field]),
    /// `map<string, string>` (entries {1: key, 2: value}).
    StrMap,
    /// `map<string, ExtraValue>` where ExtraValue is {1: repeated string}.
    StrsMap,
}

/// One field of a message schema.
#[derive(Debug, Clone, Copy)]
struct Field {
    number: u64,
    name: &'static str,
    ty: Ty,
}

const fn f(number: u64, name: &'static str, ty: Ty) -> Field {
    Field { number, name, ty }
}

const OWNER_REFERENCE: &[Field] = &[
    f(1, "kind", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(5, "apiVersion", Ty::Str),
    f(6, "controller", Ty::OptBool),
    f(7, "blockOwnerDeletion", Ty::OptBool),
];

const OBJECT_META: &[Field] = &[
    f(1, "name", Ty::Str),
    f(2, "generateName", Ty::Str),
    f(3, "namespace", Ty::Str),
    f(5, "uid", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "generation", Ty::Int),
    f(8, "creationTimestamp", Ty::Time),
    f(9, "deletionTimestamp", Ty::Time),
    f(10, "deletionGracePeriodSeconds", Ty::OptInt),
    f(11, "labels", Ty::StrMap),
    f(12, "annotations", Ty::StrMap),
    f(13, "ownerReferences", Ty::Msgs(OWNER_REFERENCE)),
    f(14, "finalizers", Ty::Strs),
];

const OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Ty::Str),
    f(2, "namespace", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(5, "apiVersion", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "fieldPath", Ty::Str),
];

const LOCAL_OBJECT_REFERENCE: &[Field] = &[f(1, "name", Ty::Str)];

const SERVICE_ACCOUNT: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "secrets", Ty::Msgs(OBJECT_REFERENCE)),
    f(3, "imagePullSecrets", Ty::Msgs(LOCAL_OBJECT_REFERENCE)),
    f(4, "automountServiceAccountToken", Ty::OptBool),
];

const NAMESPACE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "spec", Ty::Msg(&[f(1, "finalizers", Ty::Strs)])),
];

const POLICY_RULE: &[Field] = &[
    f(1, "verbs", Ty::Strs),
    f(2, "apiGroups", Ty::Strs),
    f(3, "resources", Ty::Strs),
    f(4, "resourceNames", Ty::Strs),
    f(5, "nonResourceURLs", Ty::Strs),
];

const LABEL_SELECTOR: &[Field] = &[
    f(1, "matchLabels", Ty::StrMap),
    f(
        2,
        "matchExpressions",
        Ty::Msgs(&[
            f(1, "key", Ty::Str),
            f(2, "operator", Ty::Str),
            f(3, "values", Ty::Strs),
        ]),
    ),
];

const ROLE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "rules", Ty::Msgs(POLICY_RULE)),
];

const CLUSTER_ROLE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "rules", Ty::Msgs(POLICY_RULE)),
    f(
        3,
        "aggregationRule",
        Ty::Msg(&[f(1, "clusterRoleSelectors", Ty::Msgs(LABEL_SELECTOR))]),
    ),
];

const SUBJECT: &[Field] = &[
    f(1, "kind", Ty::Str),
    f(2, "apiGroup", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "namespace", Ty::Str),
];

const ROLE_REF: &[Field] = &[
    f(1, "apiGroup", Ty::Str),
    f(2, "kind", Ty::Str),
    f(3, "name", Ty::Str),
];

const BINDING: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "subjects", Ty::Msgs(SUBJECT)),
    f(3, "roleRef", Ty::Msg(ROLE_REF)),
];

const TOKEN_REQUEST: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            f(1, "audiences", Ty::Strs),
            f(
                3,
                "boundObjectRef",
                Ty::Msg(&[
                    f(1, "kind", Ty::Str),
                    f(2, "apiVersion", Ty::Str),
                    f(3, "name", Ty::Str),
                    f(4, "uid", Ty::Str),
                ]),
            ),
            f(4, "expirationSeconds", Ty::OptInt),
        ]),
    ),
];

const TOKEN_REVIEW: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[f(1, "token", Ty::Str), f(2, "audiences", Ty::Strs)]),
    ),
];

const SELF_SUBJECT_REVIEW: &[Field] = &[f(1, "metadata", Ty::Msg(OBJECT_META))];

const RESOURCE_ATTRIBUTES: &[Field] = &[
    f(1, "namespace", Ty::Str),
    f(2, "verb", Ty::Str),
    f(3, "group", Ty::Str),
    f(4, "version", Ty::Str),
    f(5, "resource", Ty::Str),
    f(6, "subresource", Ty::Str),
    f(7, "name", Ty::Str),
];

const NON_RESOURCE_ATTRIBUTES: &[Field] = &[f(1, "path", Ty::Str), f(2, "verb", Ty::Str)];

const SUBJECT_ACCESS_REVIEW: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            f(1, "resourceAttributes", Ty::Msg(RESOURCE_ATTRIBUTES)),
            f(2, "nonResourceAttributes", Ty::Msg(NON_RESOURCE_ATTRIBUTES)),
            f(3, "user", Ty::Str),
            f(4, "groups", Ty::Strs),
            f(5, "extra", Ty::StrsMap),
            f(6, "uid", Ty::Str),
        ]),
    ),
];

const SELF_SUBJECT_ACCESS_REVIEW: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            f(1, "resourceAttributes", Ty::Msg(RESOURCE_ATTRIBUTES)),
            f(2, "nonResourceAttributes", Ty::Msg(NON_RESOURCE_ATTRIBUTES)),
        ]),
    ),
];

/// The schema of a top-level type.
fn schema(api_version: &str, kind: &str) -> Option<&'static [Field]> {
    Some(match (api_version, kind) {
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("v1", "Namespace") => NAMESPACE,
        ("rbac.authorization.k8s.io/v1", "Role") => ROLE,
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => CLUSTER_ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => BINDING,
        ("authentication.k8s.io/v1", "TokenRequest") => TOKEN_REQUEST,
        ("authentication.k8s.io/v1", "TokenReview") => TOKEN_REVIEW,
        ("authentication.k8s.io/v1", "SelfSubjectReview") => SELF_SUBJECT_REVIEW,
        ("authorization.k8s.io/v1", "SubjectAccessReview") => SUBJECT_ACCESS_REVIEW,
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => SELF_SUBJECT_ACCESS_REVIEW,
        _ => return None,
    })
}

/// Whether a Content-Type header names the Kubernetes protobuf media type.
pub fn is_protobuf(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case(MEDIA_TYPE))
    })
}

/// Decodes a whole protobuf body into the object's JSON form, `apiVersion` and `kind`
/// included.
pub fn decode_object(body: &[u8]) -> Result<Value, ProtobufError> {
    let envelope = body.strip_prefix(MAGIC).ok_or(ProtobufError::NoMagic)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for field in Reader(envelope) {
        let (number, value) = field?;
        match (number, value) {
            (1, Wire::Bytes(type_meta)) => {
                for inner in Reader(type_meta) {
                    match inner? {
                        (1, Wire::Bytes(text)) => api_version = utf8(text)?,
                        (2, Wire::Bytes(text)) => kind = utf8(text)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(bytes)) => raw = bytes,
            (3, Wire::Bytes(encoding)) if !encoding.is_empty() => {
                return Err(ProtobufError::Malformed(
                    "content encodings in the envelope are not supported",
                ));
            }
            _ => {}
        }
    }
    let fields = schema(&api_version, &kind).ok_or_else(|| ProtobufError::UnknownType {
        api_version: api_version.clone(),
        kind: kind.clone(),
    })?;
    let mut object = decode_message(raw, fields)?;
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    Ok(Value::Object(object))
}

/// A field's wire value.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Iterates over the (field number, value) pairs of one message.
struct Reader<'a>(&'a [u8]);

fn varint(buffer: &mut &[u8]) -> Result<u64, ProtobufError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buffer
            .split_first()
            .ok_or(ProtobufError::Malformed("truncated varint"))?;
        *buffer = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ProtobufError::Malformed("varint longer than 10 bytes"))
}

fn take<'a>(buffer: &mut &'a [u8], length: usize) -> Result<&'a [u8], ProtobufError> {
    if buffer.len() < length {
        return Err(ProtobufError::Malformed("truncated field"));
    }
    let (head, rest) = buffer.split_at(length);
    *buffer = rest;
    Ok(head)
}

impl<'a> Iterator for Reader<'a> {
    type Item = Result<(u64, Wire<'a>), ProtobufError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let mut step = || -> Result<(u64, Wire<'a>), ProtobufError> {
            let key = varint(&mut self.0)?;
            let value = match key & 7 {
                0 => Wire::Varint(varint(&mut self.0)?),
                1 => {
                    take(&mut self.0, 8)?;
                    Wire::Fixed
                }
                2 => {
                    let length = usize::try_from(varint(&mut self.0)?)
                        .map_err(|_| ProtobufError::Malformed("length out of range"))?;
                    Wire::Bytes(take(&mut self.0, length)?)
                }
                5 => {
                    take(&mut self.0, 4)?;
                    Wire::Fixed
                }
                _ => return Err(ProtobufError::Malformed("unsupported wire type")),
            };
            Ok((key >> 3, value))
        };
        let result = step();
        if result.is_err() {
            // Stop after an error: the rest cannot be framed.
            self.0 = &[];
        }
        Some(result)
    }
}

fn utf8(bytes: &[u8]) -> Result<String, ProtobufError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtobufError::Malformed("a string is not UTF-8"))
}

fn strings_of(bytes: &[u8]) -> Result<Vec<String>, ProtobufError> {
    Reader(bytes)
        .filter_map(|field| match field {
            Ok((1, Wire::Bytes(text))) => Some(utf8(text)),
            Ok(_) => None,
            Err(error) => Some(Err(error)),
        })
        .collect()
}

/// A map entry {1: key, 2: value}.
fn map_entry(bytes: &[u8]) -> Result<(String, &[u8]), ProtobufError> {
    let mut key = String::new();
    let mut value: &[u8] = &[];
    for field in Reader(bytes) {
        match field? {
            (1, Wire::Bytes(text)) => key = utf8(text)?,
            (2, Wire::Bytes(bytes)) => value = bytes,
            _ => {}
        }
    }
    Ok((key, value))
}

fn wrong_wire() -> ProtobufError {
    ProtobufError::Malformed("a field has the wrong wire type for its schema")
}

fn decode_message(bytes: &[u8], fields: &[Field]) -> Result<Map<String, Value>, ProtobufError> {
    let mut object = Map::new();
    for item in Reader(bytes) {
        let (number, wire) = item?;
        let Some(field) = fields.iter().find(|f| f.number == number) else {
            continue;
        };
        let name = field.name.to_string();
        match (field.ty, wire) {
            (Ty::Str, Wire::Bytes(text)) => {
                let text = utf8(text)?;
                if text.is_empty() {
                    object.remove(&name);
                } else {
                    object.insert(name, json!(text));
                }
            }
            (Ty::Int, Wire::Varint(n)) => {
                // Two's complement, as int64 varints are.
                let n = n as i64;
                if n == 0 {
                    object.remove(&name);
                } else {
                    object.insert(name, json!(n));
                }
            }
            (Ty::OptInt, Wire::Varint(n)) => {
                object.insert(name, json!(n as i64));
            }
            (Ty::OptBool, Wire::Varint(n)) => {
                object.insert(name, json!(n != 0));
            }
            (Ty::Time, Wire::Bytes(time)) => {
                let mut seconds = 0i64;
                for part in Reader(time) {
                    if let (1, Wire::Varint(s)) = part? {
                        seconds = s as i64;
                    }
                }
                if seconds == 0 {
                    object.remove(&name);
                } else {
                    object.insert(name, json!(format_rfc3339(seconds)));
                }
            }
            (Ty::Msg(inner), Wire::Bytes(message)) => {
                let decoded = decode_message(message, inner)?;
                if decoded.is_empty() {
                    object.remove(&name);
                } else {
                    object.insert(name, Value::Object(decoded));
                }
            }
            (Ty::Strs, Wire::Bytes(text)) => push(&mut object, name, json!(utf8(text)?)),
            (Ty::Msgs(inner), Wire::Bytes(message)) => {
                let decoded = decode_message(message, inner)?;
                push(&mut object, name, Value::Object(decoded));
            }
            (Ty::StrMap, Wire::Bytes(entry)) => {
                let (key, value) = map_entry(entry)?;
                insert_into(&mut object, name, key, json!(utf8(value)?));
            }
            (Ty::StrsMap, Wire::Bytes(entry)) => {
                let (key, value) = map_entry(entry)?;
                insert_into(&mut object, name, key, json!(strings_of(value)?));
            }
            _ => return Err(wrong_wire()),
        }
    }
    Ok(object)
}

fn push(object: &mut Map<String, Value>, name: String, value: Value) {
    match object.entry(name).or_insert_with(|| json!([])) {
        Value::Array(items) => items.push(value),
        other => *other = json!([value]),
    }
}

fn insert_into(object: &mut Map<String, Value>, name: String, key: String, value: Value) {
    match object.entry(name).or_insert_with(|| json!({})) {
        Value::Object(map) => {
            map.insert(key, value);
        }
        other => *other = json!({ key: value }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A tiny encoder for building test bodies.
    fn key(number: u64, wire: u64) -> Vec<u8> {
        encode_varint((number << 3) | wire)
    }

    fn encode_varint(mut n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = key(number, 2);
        out.extend(encode_varint(payload.len() as u64));
        out.extend_from_slice(payload);
        out
    }

    fn int(number: u64, n: u64) -> Vec<u8> {
        let mut out = key(number, 0);
        out.extend(encode_varint(n));
        out
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [bytes(1, api_version.as_bytes()), bytes(2, kind.as_bytes())].concat();
        [
            MAGIC.to_vec(),
            bytes(1, &type_meta),
            bytes(2, raw),
            bytes(3, b""),
            bytes(4, b""),
        ]
        .concat()
    }

    /// `kubectl create serviceaccount sa1 -n ns1`, byte for byte as kubectl 1.32 sent it.
    const KUBECTL_SERVICE_ACCOUNT: &[u8] = b"k8s\x00\x0a\x14\x0a\x02v1\x12\x0eServiceAccount\
        \x12\x18\x0a\x16\x0a\x03sa1\x12\x00\x1a\x03ns1\x22\x00\x2a\x00\x32\x00\x38\x00\x42\x00\
        \x1a\x00\x22\x00";

    #[test]
    fn decodes_what_kubectl_sends() {
        assert_eq!(
            decode_object(KUBECTL_SERVICE_ACCOUNT).unwrap(),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "sa1", "namespace": "ns1"}})
        );
    }

    #[test]
    fn decodes_each_schema() {
        let meta = bytes(
            1,
            &[
                bytes(1, b"x"),
                bytes(2, b""),
                int(7, 0),
                bytes(8, &[]),
                bytes(11, &[bytes(1, b"app"), bytes(2, b"web")].concat()),
                bytes(12, &[bytes(1, b"a"), bytes(2, b"b")].concat()),
            ]
            .concat(),
        );
        let rule = bytes(
            2,
            &[
                bytes(1, b"get"),
                bytes(1, b"list"),
                bytes(2, b""),
                bytes(3, b"pods"),
                bytes(4, b"web"),
            ]
            .concat(),
        );
        let cases = [
            (
                "role",
                envelope(
                    "rbac.authorization.k8s.io/v1",
                    "Role",
                    &[meta.clone(), rule].concat(),
                ),
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                       "metadata": {"name": "x", "labels": {"app": "web"}, "annotations": {"a": "b"}},
                       "rules": [{"verbs": ["get", "list"], "apiGroups": [""],
                                  "resources": ["pods"], "resourceNames": ["web"]}]}),
            ),
            (
                "cluster role binding",
                envelope(
                    "rbac.authorization.k8s.io/v1",
                    "ClusterRoleBinding",
                    &[
                        meta.clone(),
                        bytes(
                            2,
                            &[
                                bytes(1, b"User"),
                                bytes(2, b"rbac.authorization.k8s.io"),
                                bytes(3, b"alice"),
                            ]
                            .concat(),
                        ),
                        bytes(
                            2,
                            &[
                                bytes(1, b"ServiceAccount"),
                                bytes(3, b"agent"),
                                bytes(4, b"podiam"),
                            ]
                            .concat(),
                        ),
                        bytes(
                            3,
                            &[
                                bytes(1, b"rbac.authorization.k8s.io"),
                                bytes(2, b"ClusterRole"),
                                bytes(3, b"view"),
                            ]
                            .concat(),
                        ),
                    ]
                    .concat(),
                ),
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                       "metadata": {"name": "x", "labels": {"app": "web"}, "annotations": {"a": "b"}},
                       "subjects": [
                           {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"},
                           {"kind": "ServiceAccount", "name": "agent", "namespace": "podiam"}],
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}}),
            ),
            (
                "token request (kubectl create token, 10m, bound to a pod)",
                envelope(
                    "authentication.k8s.io/v1",
                    "TokenRequest",
                    &[
                        bytes(1, &bytes(2, b"")),
                        bytes(
                            2,
                            &[
                                bytes(1, b"podiam"),
                                bytes(
                                    3,
                                    &[
                                        bytes(1, b"Pod"),
                                        bytes(2, b"v1"),
                                        bytes(3, b"p"),
                                        bytes(4, b"u-1"),
                                    ]
                                    .concat(),
                                ),
                                int(4, 600),
                            ]
                            .concat(),
                        ),
                        bytes(3, &[bytes(1, b""), bytes(2, b"")].concat()),
                    ]
                    .concat(),
                ),
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                       "spec": {"audiences": ["podiam"], "expirationSeconds": 600,
                                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u-1"}}}),
            ),
            (
                "subject access review",
                envelope(
                    "authorization.k8s.io/v1",
                    "SubjectAccessReview",
                    &bytes(
                        2,
                        &[
                            bytes(
                                1,
                                &[bytes(1, b"team-a"), bytes(2, b"get"), bytes(5, b"pods")]
                                    .concat(),
                            ),
                            bytes(3, b"alice"),
                            bytes(4, b"devs"),
                            bytes(
                                5,
                                &[
                                    bytes(1, b"k"),
                                    bytes(2, &[bytes(1, b"v1"), bytes(1, b"v2")].concat()),
                                ]
                                .concat(),
                            ),
                        ]
                        .concat(),
                    ),
                ),
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                       "spec": {"resourceAttributes": {"namespace": "team-a", "verb": "get", "resource": "pods"},
                                "user": "alice", "groups": ["devs"], "extra": {"k": ["v1", "v2"]}}}),
            ),
            (
                "service account with pointer bool false and a timestamp",
                envelope(
                    "v1",
                    "ServiceAccount",
                    &[
                        bytes(
                            1,
                            &[bytes(1, b"sa"), bytes(8, &int(1, 1_735_787_045))].concat(),
                        ),
                        int(4, 0),
                    ]
                    .concat(),
                ),
                json!({"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": "sa", "creationTimestamp": "2025-01-02T03:04:05Z"},
                       "automountServiceAccountToken": false}),
            ),
        ];
        for (name, body, want) in cases {
            assert_eq!(decode_object(&body).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn rejects_what_it_cannot_decode() {
        let cases = [
            (b"{}".to_vec(), ProtobufError::NoMagic),
            (
                envelope("v1", "Pod", &[]),
                ProtobufError::UnknownType {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                },
            ),
            (
                [MAGIC.to_vec(), vec![0x0a, 0x05, 0x01]].concat(),
                ProtobufError::Malformed("truncated field"),
            ),
            (
                envelope("v1", "ServiceAccount", &int(1, 5)),
                ProtobufError::Malformed("a field has the wrong wire type for its schema"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(decode_object(&body), Err(want));
        }
        assert!(is_protobuf(Some("application/vnd.kubernetes.protobuf")));
        assert!(is_protobuf(Some(
            "application/vnd.kubernetes.protobuf; charset=x"
        )));
        assert!(!is_protobuf(Some("application/json")));
        assert!(!is_protobuf(None));
    }
}
