//! examples/orders, the REST example, does what its README shows: served from a copy on a free
//! port, through plain HTTP requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn example_file(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/orders").join(name)).unwrap()
}

fn send(addr: std::net::SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n", body.len())
        .into_bytes();
    req.extend_from_slice(body);
    raw_request(addr, &req, Duration::from_secs(30)).unwrap()
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[test]
fn the_orders_example_checks_passes_its_tests_and_answers_as_its_readme_says() {
    let t = Tree::new();
    for file in ["cage.toml", "api.lua", "page.lua", "api_test.lua"] {
        t.write(&format!("orders/{file}"), &example_file(file).replace("127.0.0.1:8080", "127.0.0.1:0"));
    }
    let path = t.path().join("orders");
    let out = pmnc(&["check", &path.display().to_string()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = pmnc(&["test", &path.display().to_string()]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("2 passed, 0 failed"), "{}", out.stdout);

    let s = Server::start(&path, &[]);
    let addr = s.addr("http");
    let r = send(addr, "POST", "/orders", "application/json", br#"{"item": "tea", "quantity": 2}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let order = json_body(&r);
    let id = order["id"].as_str().unwrap().to_string();
    assert_eq!(header(&r, "location"), Some(format!("/orders/{id}").as_str()));
    assert_eq!(json_body(&get(addr, &format!("/orders/{id}")))["item"], "tea");

    let r = send(addr, "POST", "/orders", "application/json", br#"{"item": ""}"#);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("item must be a non-empty string"), "{}", r.text());
    let r = send(addr, "POST", "/orders", "application/json", b"not json");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("request.json:"), "{}", r.text());
    let r = send(addr, "PUT", "/orders", "text/plain", b"");
    assert_eq!(r.status, 405);
    assert_eq!(header(&r, "allow"), Some("GET, HEAD, POST"));
    assert_eq!(get(addr, "/orders/nope").status, 404);

    let r = send(addr, "POST", &format!("/orders/{id}/notes"), "application/x-www-form-urlencoded", b"text=ring+first");
    assert_eq!(r.status, 303, "{}", r.text());
    let upload = b"--xx\r\ncontent-disposition: form-data; name=\"file\"; filename=\"note.txt\"\r\ncontent-type: text/plain\r\n\r\nattached text\r\n--xx--\r\n";
    let r = send(addr, "POST", &format!("/orders/{id}/attachment"), "multipart/form-data; boundary=xx", upload);
    assert_eq!(r.status, 303, "{}", r.text());
    let r = get(addr, &format!("/orders/{id}/attachment"));
    assert_eq!(r.text(), "attached text");
    assert_eq!(header(&r, "content-type"), Some("text/plain"));
    let list = json_body(&get(addr, "/orders"));
    assert_eq!(list[0]["notes"][0], "ring first");
    assert_eq!(list[0]["attachment"]["filename"], "note.txt");
    let page = get(addr, "/");
    assert!(page.text().contains("tea") && page.text().contains("ring first") && page.text().contains("multipart/form-data"), "{}", page.text());

    assert_eq!(send(addr, "DELETE", &format!("/orders/{id}"), "text/plain", b"").status, 204);
    assert_eq!(get(addr, &format!("/orders/{id}")).status, 404);
    assert_eq!(get(addr, "/orders").text(), "[]");
}
