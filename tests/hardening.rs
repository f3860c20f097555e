//! Issue 15: the JSONL target across rotation, unambiguous dedup keys, the
//! `metering_sn` registry under racing requests, admin paths, log abuse.
//! (The slow-body load test is tests/slow_body.rs: it needs the machine alone.)

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn purchase(tag: &str, n: usize) -> Vec<u8> {
    format!(r#"{{"activity":"newInstance","businessId":"b-{tag}-{n}","orderId":"CS{tag}{n:04}","orderLineId":"CS{tag}{n:04}-000001","testFlag":"0"}}"#).into_bytes()
}

fn order_ids(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSONL line is JSON"))
        .filter_map(|e| e["data"]["order_id"].as_str().map(str::to_owned))
        .collect()
}

/// The file exists right after start-up; events written after the file was
/// renamed away, and after it was deleted, are all at the path; nothing is lost.
#[tokio::test]
async fn jsonl_target_follows_rename_and_delete() {
    let gw = TestGateway::start(Backend::Embedded, "rotation").await;
    let path = gw.events_path();
    assert!(path.exists(), "events.jsonl is created at start-up");
    let rotated = path.with_extension("jsonl.1");

    // Before: 20 events. Rename mid-stream, 20 more; delete (keeping a reader
    // open on the deleted file to see what reached it), 20 more.
    let mut all = Vec::new();
    let mut after_delete = Vec::new();
    let mut deleted_reader = None;
    for n in 0..60 {
        if n == 20 {
            std::fs::rename(&path, &rotated).unwrap();
        }
        if n == 40 {
            deleted_reader = Some(std::fs::File::open(&path).expect("the gateway recreated the path after the rename"));
            std::fs::remove_file(&path).unwrap();
        }
        let res = gw.v2(&purchase("ROT", n)).await;
        assert_eq!(res.result_code().as_deref(), Some("000000"));
        let id = format!("CSROT{n:04}");
        if n >= 40 {
            after_delete.push(id.clone());
        }
        all.push(id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.drain().await;

    let at_path = order_ids(&std::fs::read_to_string(&path).unwrap_or_default());
    let in_rotated = order_ids(&std::fs::read_to_string(&rotated).unwrap());
    let mut deleted = String::new();
    deleted_reader.unwrap().read_to_string(&mut deleted).unwrap();
    let in_deleted = order_ids(&deleted);
    println!(
        "rotation: {} events; {} in the renamed file, {} in the deleted file, {} at the path",
        all.len(),
        in_rotated.len(),
        in_deleted.len(),
        at_path.len()
    );
    let at_path_set: BTreeSet<&String> = at_path.iter().collect();
    let missing: Vec<&String> = after_delete.iter().filter(|id| !at_path_set.contains(id)).collect();
    assert!(missing.is_empty(), "events answered after the delete are not at the path: {missing:?}");
    let everywhere: BTreeSet<&String> = at_path.iter().chain(&in_rotated).chain(&in_deleted).collect();
    let lost: Vec<&String> = all.iter().filter(|id| !everywhere.contains(id)).collect();
    assert!(lost.is_empty(), "events lost: {lost:?}");
    gw.stop().await;
}
