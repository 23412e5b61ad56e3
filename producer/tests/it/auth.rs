//! API authentication in process: JWTs (HS256, RS256, ES256, JWKS), hashed
//! static tokens, the `Bearer` scheme in any case, and the separate
//! metrics listener. Refusals are 401/403 with the JSON error body.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use warren::config::Secret;
use warren_producer::config::{JwtConfig, ProducerConfig, Scope, TokenConfig};
use warren_producer::App;

use crate::helpers::World;

const ISSUER: &str = "https://idp.example.test/";
const AUDIENCE: &str = "warren";
const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

fn config(w: &World) -> ProducerConfig {
    let mut cfg = ProducerConfig::default();
    cfg.http.addr = "127.0.0.1:0".parse().unwrap();
    cfg.amqp = warren::testing::amqp_config();
    cfg.amqp.url = Some(Secret::new(w.url.as_str()));
    cfg.topology.prefix = w.prefix.clone();
    cfg
}

struct Running {
    base: String,
    ops: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(cfg: ProducerConfig) -> Running {
        let app = App::build(cfg).await.expect("App::build");
        let (base, ops) = (
            format!("http://{}", app.addr()),
            format!("http://{}", app.metrics_addr()),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        let ready = format!("{ops}/readyz");
        warren::testing::eventually(Duration::from_secs(20), "/readyz", || async {
            let r = reqwest::get(ready.as_str()).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        Running {
            base,
            ops,
            shutdown,
            task,
        }
    }

    /// `GET /v1/schedules` (read) or `POST /v1/tasks` (publish) with this
    /// `Authorization` value; status and JSON body.
    async fn call(&self, publish: bool, authorization: &str) -> (u16, Value) {
        let client = reqwest::Client::new();
        let req = if publish {
            client
                .post(format!("{}/v1/tasks", self.base))
                .header("content-type", "application/json")
                .body(r#"{"task": "it.auth", "payload": {}}"#)
        } else {
            client.get(format!("{}/v1/schedules", self.base))
        };
        let resp = req
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A key pair made with openssl: (private PKCS#8 PEM path, public PEM path).
fn key_pair(dir: &Path, name: &str, algorithm: &[&str]) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub.pem"));
    let p = private.to_str().unwrap();
    let mut args = vec!["genpkey"];
    args.extend_from_slice(algorithm);
    args.extend_from_slice(&["-out", p]);
    openssl(&args);
    openssl(&[
        "pkey",
        "-in",
        p,
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (private, public)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(scope: Value) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "ci-bot", "exp": now() + 600, "nbf": now() - 5, "scope": scope})
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    format!(
        "Bearer {}",
        jsonwebtoken::encode(&header, claims, key).unwrap()
    )
}

fn refused(r: (u16, Value), status: u16, says: &str) {
    assert_eq!(r.0, status, "{}", r.1);
    let code = if status == 401 {
        "unauthorized"
    } else {
        "forbidden"
    };
    assert_eq!(r.1["error"], code, "{}", r.1);
    let message = r.1["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

#[tokio::test]
async fn jwt_bearer_tokens_are_checked_for_signature_issuer_audience_time_and_scope() {
    let w = World::new("jwt").await;
    let dir = tempfile::tempdir().unwrap();
    let (rsa_key, rsa_pub) = key_pair(
        dir.path(),
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let (ec_key, ec_pub) = key_pair(
        dir.path(),
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let secret_file = dir.path().join("hs256.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let mut cfg = config(&w);
    cfg.api.jwt = Some(JwtConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        hs256_secret_file: Some(secret_file),
        public_key_files: vec![rsa_pub.clone(), ec_pub],
        jwks_file: None,
        scopes_claim: "scope".into(),
        leeway: Duration::from_secs(5),
    });
    let app = Running::start(cfg).await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let rs = EncodingKey::from_rsa_pem(&std::fs::read(&rsa_key).unwrap()).unwrap();
    let es = EncodingKey::from_ec_pem(&std::fs::read(&ec_key).unwrap()).unwrap();

    // Each algorithm with its key; scopes as a string or an array.
    let publisher = sign(
        Algorithm::HS256,
        None,
        &hs,
        &claims(json!("openid read publish")),
    );
    let (status, body) = app.call(true, &publisher).await;
    assert_eq!(status, 202, "{body}");
    let reader = sign(Algorithm::RS256, None, &rs, &claims(json!(["read"])));
    assert_eq!(app.call(false, &reader).await.0, 200);
    refused(
        app.call(true, &reader).await,
        403,
        "lacks the `publish` scope",
    );
    let es_reader = sign(Algorithm::ES256, None, &es, &claims(json!("read")));
    assert_eq!(app.call(false, &es_reader).await.0, 200);

    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(json!("read publish"));
        f(&mut c);
        sign(Algorithm::HS256, None, &hs, &c)
    };
    refused(
        app.call(false, &with(&|c| c["exp"] = json!(now() - 3600)))
            .await,
        401,
        "expired",
    );
    refused(
        app.call(false, &with(&|c| c["nbf"] = json!(now() + 3600)))
            .await,
        401,
        "not valid yet",
    );
    refused(
        app.call(false, &with(&|c| c["aud"] = json!("someone-else")))
            .await,
        401,
        "audience",
    );
    refused(
        app.call(false, &with(&|c| c["iss"] = json!("https://evil.test/")))
            .await,
        401,
        "issuer",
    );
    refused(
        app.call(
            false,
            &with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        )
        .await,
        401,
        "`exp`",
    );
    refused(
        app.call(
            false,
            &with(&|c| {
                c.as_object_mut().unwrap().remove("scope");
            }),
        )
        .await,
        403,
        "lacks the `read` scope",
    );
    let forged = EncodingKey::from_secret(b"not-the-configured-secret-at-all-32b");
    refused(
        app.call(
            false,
            &sign(Algorithm::HS256, None, &forged, &claims(json!("read"))),
        )
        .await,
        401,
        "signature",
    );
    // Algorithm confusion: the RSA public key used as an HMAC secret.
    let confused = EncodingKey::from_secret(&std::fs::read(&rsa_pub).unwrap());
    refused(
        app.call(
            false,
            &sign(Algorithm::HS256, None, &confused, &claims(json!("read"))),
        )
        .await,
        401,
        "signature",
    );
    refused(
        app.call(
            false,
            &sign(Algorithm::RS384, None, &rs, &claims(json!("read"))),
        )
        .await,
        401,
        "algorithm",
    );
    refused(
        app.call(false, "Bearer eyJub3QganNvbg.e30.c2ln").await,
        401,
        "malformed",
    );
    // Claims are never read before the signature verifies.
    refused(
        app.call(false, "Bearer eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln")
            .await,
        401,
        "signature",
    );
    app.stop().await;
}

/// RSA public key as a JWKS with one `kid`, from openssl's modulus.
fn jwks(public: &Path, kid: &str) -> String {
    use base64::Engine;
    let text = openssl(&[
        "rsa",
        "-pubin",
        "-in",
        public.to_str().unwrap(),
        "-noout",
        "-modulus",
    ]);
    let hex = text.trim().strip_prefix("Modulus=").unwrap();
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hex::decode(hex).unwrap());
    json!({"keys": [{"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": "AQAB"}]})
        .to_string()
}

#[tokio::test]
async fn a_jwks_file_checks_tokens_by_key_id_with_a_custom_scopes_claim() {
    let w = World::new("jwks").await;
    let dir = tempfile::tempdir().unwrap();
    let (rsa_key, rsa_pub) = key_pair(
        dir.path(),
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&rsa_pub, "key-2026")).unwrap();
    let mut cfg = config(&w);
    cfg.api.jwt = Some(JwtConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        hs256_secret_file: None,
        public_key_files: vec![],
        jwks_file: Some(jwks_file),
        scopes_claim: "permissions".into(),
        leeway: Duration::from_secs(5),
    });
    let app = Running::start(cfg).await;
    let rs = EncodingKey::from_rsa_pem(&std::fs::read(&rsa_key).unwrap()).unwrap();
    let mut c = claims(json!("ignored"));
    c["permissions"] = json!(["read", "publish"]);
    assert_eq!(
        app.call(true, &sign(Algorithm::RS256, Some("key-2026"), &rs, &c))
            .await
            .0,
        202
    );
    refused(
        app.call(true, &sign(Algorithm::RS256, Some("key-2025"), &rs, &c))
            .await,
        401,
        "algorithm",
    );
    // The `scope` claim is not the configured one: no scopes.
    refused(
        app.call(
            false,
            &sign(
                Algorithm::RS256,
                Some("key-2026"),
                &rs,
                &claims(json!("read")),
            ),
        )
        .await,
        403,
        "lacks the `read` scope",
    );
    app.stop().await;
}

#[tokio::test]
async fn hashed_tokens_match_their_token_and_bearer_in_any_case() {
    let w = World::new("hashed").await;
    let token = "a-token-only-its-holder-knows-42";
    let mut cfg = config(&w);
    cfg.api.tokens = vec![TokenConfig {
        token: Secret::new(warren_producer::config::hashed_token(token.as_bytes())),
        scopes: vec![Scope::Read, Scope::Publish],
        name: Some("ci".into()),
    }];
    let app = Running::start(cfg).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (status, body) = app.call(true, &format!("{scheme} {token}")).await;
        assert_eq!(status, 202, "{scheme}: {body}");
    }
    // The digest in the config is no usable secret.
    let digest = warren_producer::config::hashed_token(token.as_bytes());
    refused(
        app.call(false, &format!("Bearer {digest}")).await,
        401,
        "unknown token",
    );
    refused(
        app.call(false, &format!("Bearer {token}x")).await,
        401,
        "unknown token",
    );
    refused(
        app.call(false, &format!("Basic {token}")).await,
        401,
        "expected `Authorization: Bearer",
    );
    app.stop().await;
}

#[tokio::test]
async fn metrics_listen_serves_metrics_and_health_apart_from_the_api() {
    let w = World::new("opslisten").await;
    let mut cfg = config(&w);
    cfg.api.publish_token = Some(Secret::new(crate::helpers::PUBLISH_TOKEN));
    cfg.api.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let app = Running::start(cfg).await;
    assert_ne!(app.base, app.ops);
    for path in ["/metrics", "/healthz", "/readyz"] {
        let ops = reqwest::get(format!("{}{path}", app.ops)).await.unwrap();
        assert_eq!(ops.status().as_u16(), 200, "{path} on the metrics listener");
        let main = reqwest::get(format!("{}{path}", app.base)).await.unwrap();
        assert_eq!(main.status().as_u16(), 404, "{path} on the API listener");
    }
    let api = reqwest::get(format!("{}/v1/schedules", app.ops))
        .await
        .unwrap();
    assert_eq!(api.status().as_u16(), 404, "no API on the metrics listener");
    let bearer = format!("Bearer {}", crate::helpers::PUBLISH_TOKEN);
    assert_eq!(app.call(false, &bearer).await.0, 200);
    app.stop().await;
}

/// Refused mutating requests leave an audit line too: who (as far as
/// known), method, path, status; never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_mutating_requests_are_audited() {
    let w = World::new("auditrefused").await;
    let cfg = w.write_config("p.toml", "");
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    let post = |token: &'static str| {
        let url = p.url("/v1/tasks");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(r#"{"task": "it.refused", "payload": {}}"#)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(post(crate::helpers::READ_TOKEN).await, 403);
    assert_eq!(post("not-a-configured-token-at-all").await, 401);
    let audit = warren::testing::eventually(Duration::from_secs(20), "two audit lines", || async {
        let lines = crate::admin::audit_lines(&p.logs());
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert!(
        audit[0].contains(
            r#"who="read_token" action=POST target="/v1/tasks" result="refused" status=403"#
        ),
        "{}",
        audit[0]
    );
    assert!(
        audit[1].contains(
            r#"who="anonymous" action=POST target="/v1/tasks" result="refused" status=401"#
        ),
        "{}",
        audit[1]
    );
    let logs = p.logs();
    assert!(!logs.contains("not-a-configured-token-at-all"), "{logs}");
}
