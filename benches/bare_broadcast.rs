//! The practical ceiling for fan-out benchmarks: a bare broadcast server on tokio +
//! tungstenite that answers just enough of protocol v1 for the load generator (hello, create,
//! join, send -> ack + msg) with no authentication, no validation and no storage.
//!
//! Usage: `bare-broadcast 127.0.0.1:0 [nodelay]` — prints `listening on <addr>` and serves
//! until killed. By default its sockets keep Nagle's algorithm (tungstenite's default), so under
//! load the kernel merges small frames written while earlier ones are unacknowledged; `nodelay`
//! sets `TCP_NODELAY` on every socket, as NanoChat does, to show what that merging is worth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Members = Vec<(u64, mpsc::UnboundedSender<Message>)>;

#[derive(Default)]
struct Rooms {
    rooms: HashMap<String, (i64, Members)>,
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let nodelay = std::env::args().nth(2).as_deref() == Some("nodelay");
    let listener = TcpListener::bind(&addr).await.expect("bind");
    println!("listening on {}", listener.local_addr().expect("addr"));
    let rooms: Arc<Mutex<Rooms>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        if nodelay && tcp.set_nodelay(true).is_err() {
            continue;
        }
        next_id += 1;
        let id = next_id;
        let rooms = rooms.clone();
        tokio::spawn(async move {
            // tungstenite zeroes its whole read buffer (128 KiB by default) before every read;
            // with chat-sized frames that would be most of this server's work.
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
            else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
            });
            let _ = tx.send(Message::text(
                r#"{"type":"hello","v":1,"challenge":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","pow_bits":0,"max_ct":8192,"history":100}"#,
            ));
            let mut my_room = String::new();
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
                    continue;
                };
                match field(&v, "type") {
                    "create" | "join" => {
                        my_room = field(&v, "room").to_owned();
                        rooms
                            .lock()
                            .unwrap()
                            .rooms
                            .entry(my_room.clone())
                            .or_default()
                            .1
                            .push((id, tx.clone()));
                        let _ = tx.send(Message::text(format!(
                            r#"{{"type":"joined","room":"{my_room}","messages":[],"more":false}}"#
                        )));
                    }
                    "send" => {
                        let mut guard = rooms.lock().unwrap();
                        let Some((seq, members)) = guard.rooms.get_mut(&my_room) else {
                            continue;
                        };
                        *seq += 1;
                        let frame = Message::text(format!(
                            r#"{{"type":"msg","seq":{},"ts":0,"epoch":{},"iv":"{}","ct":"{}"}}"#,
                            seq,
                            v["epoch"],
                            field(&v, "iv"),
                            field(&v, "ct")
                        ));
                        for (member, out) in members.iter() {
                            if *member != id {
                                let _ = out.send(frame.clone());
                            }
                        }
                        let _ = tx.send(Message::text(format!(
                            r#"{{"type":"ack","ref":"{}","seq":{},"ts":0}}"#,
                            field(&v, "ref"),
                            seq
                        )));
                    }
                    _ => {}
                }
            }
            if let Some((_, members)) = rooms.lock().unwrap().rooms.get_mut(&my_room) {
                members.retain(|(m, _)| *m != id);
            }
        });
    }
}
