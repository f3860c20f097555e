//! docs/openapi.yaml against the admin API: the document lists exactly the routes the router serves
//! (`koogate::admin::ROUTES`, which the router matches requests against), its examples fit its schemas, and
//! on a running gateway (both stores) every documented operation, called with its examples, answers its
//! documented success status with a body that fits the documented schema, and 401 without the token; an
//! unknown id in the path answers a documented 404 and a body that is not JSON a documented 400, each fitting.

use std::collections::BTreeSet;
use std::time::Duration;

use hyper::Method;
use serde_json::{json, Value};

use crate::common::billing::{ok, Billing, SECRET};
use crate::common::{fixture_files, wait_until, Backend, TestGateway, BACKENDS};

const TOKEN: &str = "admin-token-for-openapi-3b1e";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn doc() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("docs/openapi.yaml is not YAML: {e}"))
}

/// Every documented operation: (METHOD, path, operation object).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            assert!(METHODS.contains(&method.as_str()), "{path}: {method:?} is not an HTTP method");
            ops.push((method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    ops
}

/// Follows a `$ref` into the document (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap_or_else(|| panic!("dangling $ref {r}")),
        None => v,
    }
}

/// Why `instance` does not fit `schema` (a schema of the document, its `$ref`s resolved in the document).
fn fit(doc: &Value, schema: &Value, instance: &Value) -> Result<(), String> {
    let mut root = schema.clone();
    root.as_object_mut().expect("a schema is an object").insert("components".into(), doc["components"].clone());
    let validator = jsonschema::draft202012::new(&root).map_err(|e| format!("the schema is not valid: {e}"))?;
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{e} (at {})", e.instance_path())).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The JSON schema and example of an operation's answer with `status`.
fn response(doc: &Value, op: &Value, status: u16) -> Option<(Value, Option<Value>)> {
    let res = resolve(doc, op["responses"].get(status.to_string())?);
    let media = &res["content"]["application/json"];
    Some((media["schema"].clone(), media.get("example").cloned()))
}

/// The lowest 2xx an operation documents: what a valid example gets.
fn success(op: &Value) -> u16 {
    op["responses"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|k| k.parse::<u16>().ok())
        .filter(|s| (200..300).contains(s))
        .min()
        .expect("an operation documents a 2xx")
}

#[test]
fn the_document_lists_exactly_the_routes_the_router_serves() {
    let doc = doc();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "OpenAPI 3.1");
    let documented: BTreeSet<(String, String)> = operations(&doc).into_iter().map(|(m, p, _)| (m, p)).collect();
    let served: BTreeSet<(String, String)> =
        koogate::admin::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but not in docs/openapi.yaml: {undocumented:?}");
    assert!(not_served.is_empty(), "in docs/openapi.yaml but not served: {not_served:?}");
    println!("{} routes documented and served", documented.len());
}

#[test]
fn every_example_fits_its_schema_and_every_operation_is_complete() {
    let doc = doc();
    assert_eq!(doc["security"], json!([{"bearer": []}]), "bearer auth on every route");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let mut examples = 0;
    for (method, path, op) in operations(&doc) {
        let at = format!("{method} {path}");
        assert!(op["operationId"].is_string() && op["summary"].is_string(), "{at}: operationId and summary");
        // Every `{name}` of the path is a documented path parameter with an example, and nothing else is.
        let named: BTreeSet<&str> =
            path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        let params: Vec<&Value> = op["parameters"].as_array().map(|p| p.iter().collect()).unwrap_or_default();
        let in_path: BTreeSet<&str> =
            params.iter().filter(|p| p["in"] == "path").filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(named, in_path, "{at}: path parameters");
        for p in &params {
            let example = p.get("example").unwrap_or_else(|| panic!("{at}: parameter {} has no example", p["name"]));
            fit(&doc, &p["schema"], example).unwrap_or_else(|e| panic!("{at}: parameter {}: {e}", p["name"]));
            examples += 1;
        }
        if let Some(body) = op.get("requestBody") {
            let media = &body["content"]["application/json"];
            let example = media.get("example").unwrap_or_else(|| panic!("{at}: the request body has no example"));
            fit(&doc, &media["schema"], example).unwrap_or_else(|e| panic!("{at}: request example: {e}"));
            examples += 1;
        }
        assert!(op["responses"].get("401").is_some(), "{at}: documents 401");
        for status in op["responses"].as_object().unwrap().keys() {
            let status: u16 = status.parse().unwrap_or_else(|_| panic!("{at}: status {status:?}"));
            let (schema, example) = response(&doc, &op, status).unwrap();
            assert!(schema.is_object(), "{at} {status}: no JSON schema");
            let example = example.unwrap_or_else(|| panic!("{at} {status}: no example"));
            fit(&doc, &schema, &example).unwrap_or_else(|e| panic!("{at} {status}: example: {e}"));
            examples += 1;
        }
    }
    println!("{examples} examples fit their schemas");
}

/// The request an operation's examples make: path with its parameters filled in, and the body.
fn example_request(op: &Value, path: &str) -> (String, String) {
    let mut url = path.to_owned();
    let mut query = form_urlencoded::Serializer::new(String::new());
    for p in op["parameters"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap();
        let value = match &p["example"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match p["in"].as_str() {
            Some("path") => {
                let encoded = percent_encoding::utf8_percent_encode(&value, percent_encoding::NON_ALPHANUMERIC);
                url = url.replace(&format!("{{{name}}}"), &encoded.to_string());
            }
            Some("query") => {
                query.append_pair(name, &value);
            }
            other => panic!("{path}: parameter {name} in {other:?}"),
        }
    }
    let query = query.finish();
    if !query.is_empty() {
        url = format!("{url}?{query}");
    }
    let body = op["requestBody"]["content"]["application/json"].get("example").map_or(String::new(), Value::to_string);
    (url, body)
}

async fn live(backend: Backend, doc: &Value) {
    // The billing core refuses the first purchase's creation: one dead letter to look at and redrive.
    let dead = "evt_028e3b0c-7d93-5e10-9156-f940561c8e6a_1";
    let billing = Billing::start(move |id, _, _| if id == dead { (400, Duration::ZERO) } else { ok() }).await;
    let url = billing.url();
    let gw = TestGateway::start_with(
        backend,
        "openapi",
        &[("KOOGATE_BILLING_URL", &url), ("KOOGATE_BILLING_SECRET", SECRET), ("KOOGATE_ADMIN_TOKEN", TOKEN)],
    )
    .await;
    for rel in fixture_files("v2").into_iter().chain(["v1/01-newInstance-stored-value-cards.json".to_owned()]) {
        let res = if rel.starts_with("v1/") { gw.v1_fixture(&rel).await } else { gw.v2_fixture(&rel).await };
        assert_eq!(res.result_code().as_deref(), Some("000000"), "{rel}");
    }
    wait_until("the refused event is dead-lettered", Duration::from_secs(20), async || {
        gw.admin_json(Method::GET, &format!("/v1/dlq/{dead}"), Some(TOKEN), "").await.0 == 200
    })
    .await;
    // The account index is written as the purchase's subscription.created is delivered.
    let v1_created = "evt_21ab9e22-5c60-5afb-b878-85ea829f9cda_1";
    wait_until("the V1 purchase is delivered", Duration::from_secs(20), async || {
        billing.delivered().iter().any(|a| a.id == v1_created)
    })
    .await;
    // The usage record the usage examples name, in a recent hour (KooGallery takes up to 21 days old).
    let usage = operations(doc).into_iter().find(|(m, p, _)| m == "POST" && p == "/v1/usage").unwrap().2;
    let mut body: Value = serde_json::from_str(&example_request(&usage, "/v1/usage").1).unwrap();
    let hour = chrono::Utc::now().timestamp() / 3600 * 3600 - 3600;
    let time = |secs: i64| chrono::DateTime::from_timestamp(secs, 0).unwrap().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    body["records"][0]["begin_time"] = time(hour).into();
    body["records"][0]["end_time"] = time(hour + 3600).into();
    let (status, answer) = gw.admin_json(Method::POST, "/v1/usage", Some(TOKEN), body.to_string()).await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(1)), "{answer}");

    // Reads first, then writes (a redrive empties the dead letter the reads look at).
    let mut ops = operations(doc);
    ops.sort_by_key(|(m, _, _)| m != "GET");
    for (method, path, op) in ops {
        let at = format!("{backend:?}: {method} {path}");
        let (url, body) = example_request(&op, &path);
        let verb = Method::from_bytes(method.as_bytes()).unwrap();

        let (status, answer) = gw.admin_json(verb.clone(), &url, None, body.clone()).await;
        assert_eq!(status, 401, "{at} without the token: {answer}");
        let (schema, _) = response(doc, &op, 401).unwrap();
        fit(doc, &schema, &answer).unwrap_or_else(|e| panic!("{at} 401: {e}: {answer}"));

        let (status, answer) = gw.admin_json(verb, &url, Some(TOKEN), body.clone()).await;
        assert!(status != 404 && status != 405, "{at} ({url}) is not served: {status} {answer}");
        assert_eq!(status, success(&op), "{at} ({url}) with its examples: {answer}");
        let (schema, _) = response(doc, &op, status).unwrap();
        fit(doc, &schema, &answer).unwrap_or_else(|e| panic!("{at} {status}: the answer does not fit: {e}: {answer}"));
        // The documented errors, reached: an unknown id in the path, a body that is not JSON.
        let mut errors = Vec::new();
        if op["parameters"].as_array().into_iter().flatten().any(|p| p["in"] == "path") {
            let mut unknown = op.clone();
            for p in unknown["parameters"].as_array_mut().unwrap() {
                if p["in"] == "path" {
                    p["example"] = json!("evt_unknown-0_9");
                }
            }
            errors.push((404, example_request(&unknown, &path)));
        }
        if op.get("requestBody").is_some() {
            errors.push((400, (url.clone(), "{\"records\":".to_owned())));
        }
        for (expected, (url, body)) in errors {
            let (schema, _) = response(doc, &op, expected)
                .unwrap_or_else(|| panic!("{at}: answers {expected} but does not document it"));
            let verb = Method::from_bytes(method.as_bytes()).unwrap();
            let (status, answer) = gw.admin_json(verb, &url, Some(TOKEN), body).await;
            assert_eq!(status, expected, "{at} ({url}): {answer}");
            fit(doc, &schema, &answer)
                .unwrap_or_else(|e| panic!("{at} {status}: the answer does not fit: {e}: {answer}"));
        }
        // The events the admin API shows fit the event catalogue too.
        let shown = answer["dead_letters"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(answer["events"].as_array().into_iter().flatten());
        for event in shown.chain([&answer]).map(|v| &v["event"]).filter(|e| e.is_object()) {
            crate::common::catalogue::assert_event(event);
        }
    }
    gw.stop().await;
    billing.stop();
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented_on_both_stores() {
    let doc = doc();
    for backend in BACKENDS {
        live(backend, &doc).await;
    }
}
