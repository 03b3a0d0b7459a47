//! The control API's errors: every one a JSON body `{"error": ...}` with the right status,
//! bodies validated and bounded, and none of it disturbing the VM.
mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// Sends one raw HTTP/1.1 request; returns the status and the body parsed as JSON.
fn request(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    ctype: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !ctype.is_empty() {
        req.push_str(&format!("Content-Type: {ctype}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let v = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, v)
}

fn error_of(v: &serde_json::Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error member in {v}"))
}

#[test]
fn every_api_error_is_json_with_its_status_and_bad_bodies_change_nothing() {
    let s = Scratch::new("api");
    let sock = s.path("a.sock");
    let mut vm = Running::start(&[
        "--memory",
        "64M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--guest",
        "heartbeat period=2000",
    ]);
    vm.wait_line(|l| l.starts_with("H0 "));
    let json = "application/json";
    // (method, path, content type, body, status, text of the error)
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/nope", "", vec![], 404, "no such route: /nope"),
        (
            "POST",
            "/vm/pause",
            "",
            vec![],
            405,
            "POST is not allowed on /vm/pause",
        ),
        (
            "PUT",
            "/vm/pause",
            json,
            b"[1,2,3]".to_vec(),
            400,
            "takes no body",
        ),
        (
            "PUT",
            "/vm/shutdown",
            json,
            b"{}".to_vec(),
            400,
            "takes no body",
        ),
        ("PUT", "/vm/snapshot", json, b"{".to_vec(), 400, "not JSON"),
        (
            "PUT",
            "/vm/snapshot",
            json,
            br#"{"to": 5}"#.to_vec(),
            400,
            "bad request body",
        ),
        (
            "PUT",
            "/vm/snapshot",
            json,
            br#"{"to": "/nonexistent/ferry-api-test", "extra": 1}"#.to_vec(),
            400,
            "unknown field",
        ),
        (
            "PUT",
            "/vm/snapshot",
            "text/plain",
            br#"{"to": "/nonexistent/ferry-api-test"}"#.to_vec(),
            415,
            "Content-Type: application/json",
        ),
        (
            "PUT",
            "/vm/migrate",
            json,
            vec![b' '; 100 << 10],
            413,
            "larger than",
        ),
        (
            "PUT",
            "/vm/migrate",
            json,
            br#"{"to": "127.0.0.1:1"}"#.to_vec(),
            400,
            "insecure",
        ),
    ];
    for (method, path, ctype, body, status, text) in cases {
        let (got, v) = request(&sock, method, path, ctype, &body);
        assert_eq!(got, status, "{method} {path}: {v}");
        assert!(error_of(&v).contains(text), "{method} {path}: {v}");
    }
    // None of it touched the VM: it runs, and a good request still works.
    let (got, v) = request(&sock, "GET", "/vm", "", &[]);
    assert_eq!(got, 200);
    assert_eq!(v["state"], "running", "{v}");
    let n = vm.seen.len();
    vm.wait_line(|l| l.starts_with("H0 "));
    assert!(vm.seen.len() > n);
    let (got, _) = request(&sock, "PUT", "/vm/pause", "", &[]);
    assert_eq!(got, 204);
    let (got, v) = request(&sock, "PUT", "/vm/pause", "", &[]);
    assert_eq!(got, 409);
    assert!(error_of(&v).contains("paused"), "{v}");
    ferry_ok(&["vm", "shutdown", "--api-socket", sock.to_str().unwrap()]);
    let (code, _, _) = vm.finish();
    assert_eq!(code, 0);
}
