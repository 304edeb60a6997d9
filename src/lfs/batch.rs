//! The batch API's JSON (git-lfs `docs/api/batch.md`): which requests the cache takes part in,
//! and the rewrite of the upstream's answer. Only the `download` actions of the objects the
//! upstream authorized change, to proxy links; everything else (per-object errors, other
//! fields) stays as the upstream wrote it. No I/O here.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::Oid;

/// The largest upstream batch answer read for the rewrite. Clients ask for at most 100
/// objects per batch; GitHub's answers take about 1 KiB per object.
pub const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Whether a batch request body asks to download with the `basic` transfer and SHA-256 OIDs:
/// the requests whose answers are rewritten. Others pass through unchanged.
pub fn is_cacheable_download(body: &[u8]) -> bool {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let operation = request.get("operation").and_then(Value::as_str);
    // Absent means `basic` (batch.md); a client that offers it lets the server pick it.
    let basic = match request.get("transfers") {
        None => true,
        Some(Value::Array(transfers)) => transfers.iter().any(|t| t.as_str() == Some("basic")),
        Some(_) => false,
    };
    let sha256 = match request.get("hash_algo") {
        None => true,
        Some(algo) => algo.as_str() == Some("sha256"),
    };
    // The typed reading of `operation` refuses duplicates, as the token lending does.
    operation == Some("download")
        && self::operation(body).as_deref() == Some("download")
        && basic
        && sha256
}

/// The top-level `operation` of a batch request, read as the upstream reads it: JSON, so
/// escapes and white space mean what they mean there. A body that is not a JSON object with
/// exactly one string `operation` (a duplicate could be read either way) has none.
pub fn operation(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Batch {
        operation: String,
    }
    // The typed parse alone skips the other fields loosely (invalid escapes, bad UTF-8,
    // numbers out of range) and takes an array for the struct: the whole body must first be a
    // valid JSON object. The typed parse then refuses a duplicated `operation`.
    let value: Value = serde_json::from_slice(body).ok()?;
    if !value.is_object() {
        return None;
    }
    serde_json::from_slice::<Batch>(body)
        .ok()
        .map(|b| b.operation)
}

/// Where the upstream said one object can be downloaded. It stays on the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The storage URL, as given.
    pub href: String,
    /// Headers to send with it, as given.
    pub header: Vec<(String, String)>,
    /// When the upstream said the `href` stops working, if it did.
    pub expires_at: Option<SystemTime>,
}

/// An object the upstream authorized for download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// Its OID.
    pub oid: Oid,
    /// The size the upstream announced.
    pub size: u64,
    /// The upstream's download action.
    pub action: Action,
}

/// Rewrite an upstream batch answer: each object with a valid `download` action gets the link
/// `link(oid, size, expires)` instead (expiring at `now + max_ttl`, or earlier when the
/// upstream's own link expires earlier; `expires` in seconds since the Unix epoch) and
/// `authenticated: true`, so that the client sends no credentials of its own to the proxy.
/// Returns the new answer and the authorized objects, or `None` when the answer is not a
/// `basic` transfer batch answer over SHA-256 (it is then passed on unchanged).
pub fn rewrite(
    answer: &[u8],
    now: SystemTime,
    max_ttl: Duration,
    mut link: impl FnMut(&Oid, u64, u64) -> String,
) -> Option<(Vec<u8>, Vec<Authorized>)> {
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(answer) else {
        return None;
    };
    if answer
        .get("transfer")
        .is_some_and(|t| t.as_str() != Some("basic"))
        || answer
            .get("hash_algo")
            .is_some_and(|a| a.as_str() != Some("sha256"))
    {
        return None;
    }
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let ceiling = now_secs.saturating_add(max_ttl.as_secs());
    let mut authorized = Vec::new();
    for object in answer.get_mut("objects")?.as_array_mut()? {
        let Some(object) = object.as_object_mut() else {
            continue;
        };
        let Some((oid, size, action)) = download(object, now) else {
            continue;
        };
        let expires = action
            .expires_at
            .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(ceiling, |at| at.as_secs().min(ceiling));
        let href = link(&oid, size, expires);
        let mut rewritten = Map::new();
        rewritten.insert("href".into(), Value::String(href));
        rewritten.insert(
            "expires_in".into(),
            Value::from(expires.saturating_sub(now_secs)),
        );
        if let Some(Value::Object(actions)) = object.get_mut("actions") {
            actions.insert("download".into(), Value::Object(rewritten));
        }
        object.insert("authenticated".into(), Value::Bool(true));
        authorized.push(Authorized { oid, size, action });
    }
    let body = serde_json::to_vec(&Value::Object(answer)).ok()?;
    Some((body, authorized))
}

/// The OID, size and valid download action of an answer's object, unless it has an error or
/// anything is malformed (then it is left as it is).
fn download(object: &Map<String, Value>, now: SystemTime) -> Option<(Oid, u64, Action)> {
    if object.contains_key("error") {
        return None;
    }
    let oid = Oid::parse(object.get("oid")?.as_str()?)?;
    let size = object.get("size")?.as_u64()?;
    let action = object.get("actions")?.get("download")?.as_object()?;
    let href = action.get("href")?.as_str()?;
    if !(href.starts_with("https://") || href.starts_with("http://")) {
        return None;
    }
    let header = match action.get("header") {
        None => Vec::new(),
        Some(Value::Object(h)) => h
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect::<Option<_>>()?,
        Some(_) => return None,
    };
    // `expires_in` wins over `expires_at` (batch.md).
    let expires_at = match (action.get("expires_in"), action.get("expires_at")) {
        (Some(secs), _) => {
            let secs = secs.as_i64()?;
            Some(match u64::try_from(secs) {
                Ok(secs) => now + Duration::from_secs(secs),
                Err(_) => now,
            })
        }
        // A time humantime cannot read (an offset other than `Z`) leaves the proxy's own
        // lifetime: a link that outlives the upstream's fails its download, it grants nothing.
        (None, Some(at)) => humantime::parse_rfc3339_weak(at.as_str()?).ok(),
        (None, None) => None,
    };
    Some((
        oid,
        size,
        Action {
            href: href.to_owned(),
            header,
            expires_at,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn only_basic_sha256_downloads_are_cached() {
        let yes = |body: &str| is_cacheable_download(body.as_bytes());
        assert!(yes(r#"{"operation":"download","objects":[]}"#));
        assert!(yes(
            r#"{"operation":"download","transfers":["lfs-standalone-file","basic"],"hash_algo":"sha256","objects":[]}"#
        ));
        assert!(!yes(r#"{"operation":"upload","objects":[]}"#));
        assert!(!yes(
            r#"{"operation":"download","transfers":["ssh"],"objects":[]}"#
        ));
        assert!(!yes(
            r#"{"operation":"download","hash_algo":"sha512","objects":[]}"#
        ));
        assert!(!yes(r#"{"operation":"download","operation":"download"}"#));
        assert!(!yes("[]"));
    }

    #[test]
    fn authorized_downloads_get_proxy_links_and_errors_stay() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let answer = format!(
            r#"{{"transfer":"basic","objects":[
              {{"oid":"{A}","size":5,"actions":{{"download":{{"href":"https://storage/a?sig=x",
                "header":{{"X-Token":"t"}},"expires_in":60}}}}}},
              {{"oid":"{B}","size":7,"error":{{"code":404,"message":"Object does not exist"}}}},
              {{"oid":"{B}","size":7,"actions":{{"download":{{"href":"ftp://storage/b"}}}}}}
            ]}}"#
        );
        let (body, authorized) = rewrite(
            answer.as_bytes(),
            now,
            Duration::from_secs(3600),
            |oid, size, expires| format!("http://proxy/{oid}?size={size}&expires={expires}"),
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        let objects = body["objects"].as_array().unwrap();
        let download = &objects[0]["actions"]["download"];
        assert_eq!(
            download["href"],
            format!("http://proxy/{A}?size=5&expires=1000060")
        );
        assert_eq!(download["expires_in"], 60);
        assert!(
            download.get("header").is_none(),
            "the upstream's headers stay"
        );
        assert_eq!(objects[0]["authenticated"], true);
        assert_eq!(objects[1]["error"]["code"], 404);
        assert!(objects[1].get("actions").is_none());
        assert_eq!(
            objects[2]["actions"]["download"]["href"], "ftp://storage/b",
            "not an HTTP link: left alone"
        );
        assert_eq!(authorized.len(), 1);
        assert_eq!(authorized[0].action.href, "https://storage/a?sig=x");
        assert_eq!(
            authorized[0].action.header,
            vec![("X-Token".to_owned(), "t".to_owned())]
        );
        assert_eq!(authorized[0].size, 5);
    }

    #[test]
    fn links_live_no_longer_than_the_ceiling() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let answer = format!(
            r#"{{"objects":[{{"oid":"{A}","size":1,"actions":{{"download":{{"href":"https://s/a"}}}}}}]}}"#
        );
        let (body, _) = rewrite(
            answer.as_bytes(),
            now,
            Duration::from_secs(600),
            |_, _, e| e.to_string(),
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["objects"][0]["actions"]["download"]["href"], "1000600");
        assert_eq!(body["objects"][0]["actions"]["download"]["expires_in"], 600);
    }

    #[test]
    fn other_answers_pass_through() {
        let link = |_: &Oid, _, _| String::new();
        let ttl = Duration::from_secs(1);
        for answer in [
            r#"{"transfer":"ssh","objects":[]}"#,
            r#"{"hash_algo":"sha512","objects":[]}"#,
            r#"{"message":"Not found"}"#,
            "lfs-echo",
        ] {
            assert!(
                rewrite(answer.as_bytes(), SystemTime::now(), ttl, link).is_none(),
                "{answer}"
            );
        }
    }
}
