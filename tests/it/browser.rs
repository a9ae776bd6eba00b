//! The browser client in real headless Chromium against a real server: chatting, access
//! without the secret, reload and server restart, a connection that dies silently, panic,
//! proof of work, a long conversation (what stays on screen, the reader's place, dates, unread
//! count, a page left open that forgets its oldest messages), links, too-long messages, device clocks
//! days off, notifications, the link as a QR code, pages without https or JavaScript, the shipped nginx
//! configuration, and no third-party requests. Plus the client's crypto against the test vectors under `node --test`.

use nanochat::client::{Client, RoomSession};
use nanochat::config::{PowMode, Rate};
use nanochat::crypto::{self, RoomKeys};
use nanochat::protocol::{ServerFrame, b64u, from_b64u};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::cdp::{Browser, Page, clock_off_by};
use crate::helpers::{
    Backend, TestApp, send_acked, spawn_app, spawn_app_with, start,
    work_rising_after_a_few_creations,
};

fn origin(app: &TestApp) -> String {
    format!("http://127.0.0.1:{}", app.port)
}

async fn set_nick(page: &Page<'_>, nick: &str) {
    page.eval(&format!(
        "(() => {{ const n = document.getElementById('nick'); n.value = {nick:?}; \
         n.dispatchEvent(new Event('change')); return true; }})()"
    ))
    .await;
}

async fn say(page: &Page<'_>, text: &str) {
    page.eval(&format!(
        "(() => {{ document.getElementById('text').value = {text:?}; \
         document.getElementById('composer').requestSubmit(); return true; }})()"
    ))
    .await;
}

async fn wait_online(page: &Page<'_>) {
    wait_online_within(page, 20).await;
}

async fn wait_online_within(page: &Page<'_>, secs: u64) {
    page.wait_for(
        "document.getElementById('status').dataset.state === 'online'",
        secs,
    )
    .await;
}

/// (nick, text) of every message shown, in order.
async fn shown(page: &Page<'_>) -> Vec<(String, String)> {
    let v = page
        .eval(
            "[...document.querySelectorAll('#messages li')].map(li => \
             [li.querySelector('.nick').textContent, li.querySelector('.text').textContent])",
        )
        .await;
    serde_json::from_value(v).unwrap()
}

/// The text of every message shown, in order.
async fn texts_of(page: &Page<'_>) -> Vec<String> {
    shown(page).await.into_iter().map(|(_, t)| t).collect()
}

/// Wait until every message this page wrote has been acknowledged.
async fn wait_all_sent(page: &Page<'_>, secs: u64) {
    page.wait_for(
        "[...document.querySelectorAll('#messages li.own')].every(li => li.dataset.status === 'sent')",
        secs,
    )
    .await;
}

async fn wait_for_text(page: &Page<'_>, text: &str) {
    page.wait_for(
        &format!(
            "[...document.querySelectorAll('#messages .text')].some(t => t.textContent === {text:?})"
        ),
        20,
    )
    .await;
}

async fn create_room(page: &Page<'_>) -> String {
    page.eval("document.getElementById('new-room').click(), true")
        .await;
    wait_online(page).await;
    page.wait_for("location.hash.length === 44 && location.href", 10)
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

/// Alice creates a room in one browser context, Bob opens its link in another; both online.
async fn two_people<'a>(browser: &'a Browser, app: &TestApp) -> (Page<'a>, Page<'a>, String) {
    let alice = browser.new_page(&format!("{}/", origin(app))).await;
    set_nick(&alice, "alice").await;
    let link = create_room(&alice).await;
    let bob = browser.new_page(&link).await;
    set_nick(&bob, "bob").await;
    wait_online(&bob).await;
    (alice, bob, link)
}

fn keys_of(link: &str) -> RoomKeys {
    let secret = from_b64u(link.split_once('#').unwrap().1).unwrap();
    RoomKeys::derive(&secret.try_into().unwrap())
}

fn assert_same_origin(page: &Page<'_>, app: &TestApp) {
    let http = origin(app);
    let ws = format!("ws://127.0.0.1:{}", app.port);
    let requests = page.requests();
    assert!(!requests.is_empty());
    for url in requests {
        assert!(
            url.starts_with(&http) || url.starts_with(&ws) || url.starts_with("about:"),
            "request to another origin: {url}"
        );
    }
    for line in page.logs() {
        assert!(
            !line.contains("Content Security Policy"),
            "CSP violation: {line}"
        );
        assert!(!line.starts_with("exception"), "{line}");
    }
}

#[test]
fn the_js_crypto_matches_the_test_vectors() {
    let out = std::process::Command::new("node")
        .args(["--test", "web/tests/"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}): install Node.js, e.g. `apt-get install -y nodejs`")
        });
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("# fail 0"));
}

#[actix_web::test]
async fn two_people_chat_both_ways_and_the_room_id_alone_is_useless() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let alice = browser.new_page(&format!("{}/", origin(&app))).await;
    set_nick(&alice, "alice").await;
    let link = create_room(&alice).await;
    assert_eq!(
        alice.eval("document.getElementById('link').value").await,
        json!(link)
    );

    let bob = browser.new_page(&link).await;
    set_nick(&bob, "bob").await;
    wait_online(&bob).await;

    say(&alice, "hello bob").await;
    wait_for_text(&bob, "hello bob").await;
    say(&bob, "hi alice <b>not bold</b>").await;
    wait_for_text(&alice, "hi alice <b>not bold</b>").await;
    for t in ["one", "two", "three"] {
        say(&alice, t).await;
    }
    wait_for_text(&bob, "three").await;
    let expected: Vec<(String, String)> = [
        ("alice", "hello bob"),
        ("bob", "hi alice <b>not bold</b>"),
        ("alice", "one"),
        ("alice", "two"),
        ("alice", "three"),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), t.to_string()))
    .collect();
    assert_eq!(shown(&bob).await, expected);
    wait_all_sent(&alice, 10).await;
    assert_eq!(shown(&alice).await, expected);
    // Text is rendered as text: no element was created from the message.
    assert_eq!(alice.count("#messages b").await, 0);

    // The server learns a message's length only to within a block: every one of these short
    // messages is stored as one padded block and its tag.
    let keys = keys_of(&link);
    let mut reader = app.client().await;
    let ServerFrame::Joined { messages, .. } = reader.join(&keys, None).await.unwrap() else {
        panic!("not joined");
    };
    assert_eq!(messages.len(), 5);
    for m in &messages {
        let ct = from_b64u(&m.ct).unwrap();
        assert_eq!(ct.len(), crypto::PAD_BLOCK + crypto::TAG_LEN);
    }
    // A third person who knows only the room id cannot join.
    let eve = browser.new_page(&format!("{}/", origin(&app))).await;
    let answer = eve
        .eval(&format!(
            "new Promise(resolve => {{ \
               const ws = new WebSocket('ws://127.0.0.1:{port}/ws'); \
               ws.onmessage = e => {{ const f = JSON.parse(e.data); \
                 if (f.type === 'hello') ws.send(JSON.stringify({{type: 'join', room: {room:?}, \
                   proof: 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'}})); \
                 else resolve(f.code || f.type); }}; }})",
            port = app.port,
            room = b64u(&keys.room_id),
        ))
        .await;
    assert_eq!(answer, json!("auth_failed"));
    // A link with another secret opens nothing and says so in words.
    let mut other = link.clone();
    other.truncate(other.len() - 3);
    other.push_str("AAA");
    let lost = browser.new_page(&other).await;
    let text = lost
        .wait_for("!document.getElementById('notice').hidden && document.getElementById('notice').textContent", 20)
        .await;
    assert!(
        text.as_str().unwrap().contains("does not open a room")
            && text.as_str().unwrap().contains("after 30 days"),
        "{text}"
    );

    for page in [&alice, &bob, &eve, &lost] {
        assert_same_origin(page, &app);
    }
}

#[actix_web::test]
async fn reload_and_server_restart_lose_nothing_and_duplicate_nothing() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, link) = two_people(&browser, &app).await;
    // One after the other, each seen before the next is written: two pages sending at once
    // may be stored in either order.
    say(&alice, "m1").await;
    wait_for_text(&bob, "m1").await;
    say(&bob, "b1").await;
    wait_for_text(&alice, "b1").await;
    say(&alice, "m2").await;
    wait_for_text(&bob, "m2").await;

    bob.reload().await;
    wait_online(&bob).await;
    wait_for_text(&bob, "m2").await;
    let texts = texts_of(&bob).await;
    assert_eq!(
        texts,
        vec!["m1", "b1", "m2"],
        "reload shows each message once"
    );
    // After the reload Bob's own message is still shown as his, and only to him.
    let own = "[...document.querySelectorAll('#messages li.own .text')].map(t => t.textContent)";
    assert_eq!(bob.eval(own).await, json!(["b1"]));
    assert_eq!(alice.eval(own).await, json!(["m1", "m2"]));

    // Kill the server; Alice types while it is down; it comes back on the same port.
    let port = app.port;
    let (mut settings, dir, db) = app.stop().await;
    alice
        .wait_for(
            "document.getElementById('status').dataset.state === 'reconnecting'",
            20,
        )
        .await;
    say(&alice, "typed while offline").await;
    settings.server.listen = format!("127.0.0.1:{port}");
    let app = start(settings, dir, db).await;
    // Someone else writes right after the restart, before the browsers are back.
    let keys = keys_of(&link);
    let mut carol = Client::connect(&app.ws_url()).await.unwrap();
    assert!(matches!(
        carol.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut s = RoomSession::new(keys.clone());
    send_acked(&mut carol, &mut s, "carol", "sent meanwhile").await;

    wait_for_text(&bob, "typed while offline").await;
    wait_for_text(&bob, "sent meanwhile").await;
    wait_for_text(&alice, "sent meanwhile").await;
    let texts = texts_of(&bob).await;
    assert_eq!(
        texts.iter().filter(|t| *t == "typed while offline").count(),
        1,
        "{texts:?}"
    );
    assert_eq!(texts.len(), 5, "{texts:?}");
    wait_all_sent(&alice, 10).await;
}

#[actix_web::test]
async fn panic_wipes_the_room_in_every_open_window() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let alice = browser.new_page(&format!("{}/", origin(&app))).await;
    let link = create_room(&alice).await;
    let bob = browser.new_page(&link).await;
    wait_online(&bob).await;
    let bob2 = browser.new_page(&link).await;
    wait_online(&bob2).await;
    say(&bob, "secret plans").await;
    wait_for_text(&alice, "secret plans").await;
    // Bob's browser remembers which session was his in this room (to show his messages as
    // his after a reload); the wipe makes it forget the room.
    let remembered =
        "Object.keys(JSON.parse(localStorage.getItem('nanochat.sessions') ?? '{}')).length";
    assert_eq!(bob.eval(remembered).await, json!(1));

    alice
        .eval("document.getElementById('panic').click(), true")
        .await;
    alice
        .wait_for("document.getElementById('panic-dialog').open", 5)
        .await;
    alice
        .eval("document.getElementById('panic-confirm').click(), true")
        .await;
    for page in [&alice, &bob, &bob2] {
        page.wait_for("!document.getElementById('gone').hidden", 20)
            .await;
        assert_eq!(page.count("#messages li").await, 0);
    }
    assert_eq!(bob.eval(remembered).await, json!(0));
    // The link afterwards says the room is gone.
    let later = browser.new_page(&link).await;
    later
        .wait_for("!document.getElementById('gone').hidden", 20)
        .await;
}

#[actix_web::test]
async fn creating_a_room_with_proof_of_work_shows_progress() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.pow.mode = PowMode::On;
        // About a million hashes on average: long enough to show progress (first reported
        // after 1000), short enough that the search's long tail stays far below the wait.
        s.pow.base_bits = 20;
        s.pow.max_bits = 20;
    })
    .await;
    let browser = Browser::launch().await;
    let page = browser.new_page(&format!("{}/", origin(&app))).await;
    // Record every change of the progress UI, independent of polling.
    page.eval(
        "window.seen = { shown: false, progress: 0 }; \
         new MutationObserver(() => { \
           if (!document.getElementById('pow').hidden) window.seen.shown = true; \
           window.seen.progress = Math.max(window.seen.progress, \
             document.getElementById('pow-progress').value); \
         }).observe(document.getElementById('landing'), { attributes: true, subtree: true }); \
         true",
    )
    .await;
    page.eval("document.getElementById('new-room').click(), true")
        .await;
    wait_online_within(&page, 90).await;
    assert_eq!(
        page.eval("window.seen.shown").await,
        json!(true),
        "progress was shown"
    );
    let progress = page.eval("window.seen.progress").await;
    assert!(
        progress.as_f64().unwrap() > 0.0,
        "progress moved: {progress}"
    );
    assert_eq!(
        page.eval("document.getElementById('pow').hidden").await,
        json!(true)
    );
    assert_eq!(app.state.metrics.rooms_created_total.get(), 1);
    assert_same_origin(&page, &app);
}

#[actix_web::test]
async fn a_conversation_fits_a_phone_screen_and_the_keyboard_alone_sends() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, _) = two_people(&browser, &app).await;
    bob.set_viewport(390, 760).await;
    say(&alice, "Are we still on for tonight?").await;
    wait_for_text(&bob, "Are we still on for tonight?").await;
    // Enter in the message box sends; Shift+Enter would add a line.
    bob.eval(
        "(() => { const t = document.getElementById('text'); t.focus(); t.value = 'Yes, 8pm at the usual place.'; \
         t.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true})); return true; })()",
    )
    .await;
    wait_for_text(&alice, "Yes, 8pm at the usual place.").await;
    say(&alice, "Great, see you there!").await;
    wait_for_text(&bob, "Great, see you there!").await;
    wait_all_sent(&bob, 10).await;
    // Nothing sticks out sideways on a phone-sized screen; controls have labels.
    assert_eq!(
        bob.eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        json!(true)
    );
    assert_eq!(
        bob.eval("[...document.querySelectorAll('#room input, #room textarea')].every(e => e.labels.length > 0)")
            .await,
        json!(true)
    );
    let png = bob.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "the page rendered something");
    if std::env::var_os("NANOCHAT_WRITE_SCREENSHOT").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/screenshot.png"),
            &png,
        )
        .unwrap();
    }
}

#[actix_web::test]
async fn older_history_pages_in_and_proof_of_work_can_be_cancelled() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.history = 5;
        s.pow.mode = PowMode::On;
        s.pow.base_bits = 34;
        s.pow.max_bits = 34;
    })
    .await;
    // Eight messages written by a Rust client before the browser opens the link. Creating the
    // room needs work at 34 bits, too much for a test: create it through the store directly.
    let keys = crate::helpers::random_room();
    let wrapped = app.state.keys.wrap_auth_key(&keys.room_id, &keys.auth_key);
    let now = nanochat::store::now_ms();
    let (two_days_ago, yesterday) = (now - 2 * 86_400_000, now - 86_400_000);
    app.state
        .store
        .create_room(&keys.room_id, &wrapped, two_days_ago)
        .await
        .unwrap();
    // The first message was stored yesterday (by the server's clock; its writer's clock said
    // a week ago, which the page does not believe).
    let mut s = RoomSession::new(keys.clone());
    let week_ago = now - 7 * 86_400_000;
    let sealed = s.seal_at("writer", "from yesterday", week_ago);
    app.state
        .store
        .append(
            &[nanochat::store::NewMessage {
                room: keys.room_id,
                epoch: nanochat::crypto::epoch_of(week_ago),
                iv: sealed.iv,
                ct: sealed.ct,
            }],
            yesterday,
        )
        .await
        .unwrap();
    let mut writer = Client::connect(&app.ws_url()).await.unwrap();
    assert!(matches!(
        writer.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    for i in 1..=8 {
        send_acked(&mut writer, &mut s, "writer", &format!("old {i}")).await;
    }
    let browser = Browser::launch().await;
    let link = format!("{}/#{}", origin(&app), b64u(keys.secret()));
    let page = browser.new_page(&link).await;
    wait_for_text(&page, "old 8").await;
    assert_eq!(shown(&page).await.len(), 5);
    page.wait_for("!document.getElementById('older').hidden", 5)
        .await;
    // On a small screen, scrolled up to the first message shown: the older ones appear above
    // it, and it stays where it was on the screen.
    page.set_viewport(390, 480).await;
    page.eval("document.getElementById('scroller').scrollTop = 0, true")
        .await;
    let before = top_of(&page, "old 4").await;
    page.eval("document.getElementById('older').click(), true")
        .await;
    wait_for_text(&page, "old 1").await;
    page.wait_for("document.getElementById('older').hidden", 5)
        .await;
    let after = top_of(&page, "old 4").await;
    assert!(
        (after - before).abs() < 1.0,
        "old 4 moved from {before} to {after}"
    );
    let texts = texts_of(&page).await;
    assert_eq!(
        texts,
        std::iter::once("from yesterday".to_owned())
            .chain((1..=8).map(|i| format!("old {i}")))
            .collect::<Vec<_>>()
    );
    // Yesterday's message shows its date; today's only their time.
    let dates = page
        .eval(&format!(
            "(() => {{ const meta = t => [...document.querySelectorAll('#messages li')].find(li => \
             li.querySelector('.text').textContent === t).querySelector('.meta').textContent; \
             const d = new Date({yesterday}); const w = new Date({week_ago}); \
             return [meta('from yesterday'), d.toLocaleString([], {{month: 'short', day: 'numeric'}}), \
             w.toLocaleString([], {{month: 'short', day: 'numeric'}}), meta('old 1')]; }})()"
        ))
        .await;
    let [old, day, writers_day, today] =
        [0, 1, 2, 3].map(|i| dates[i].as_str().unwrap().to_owned());
    assert!(old.contains(&day) && !old.contains(&writers_day), "{dates}");
    assert!(!today.contains(&day), "{dates}");

    // A new room at 34 bits would take hours: the person cancels.
    let other = browser.new_page(&format!("{}/", origin(&app))).await;
    other
        .eval("document.getElementById('new-room').click(), true")
        .await;
    other
        .wait_for("document.getElementById('pow-progress').value > 0", 20)
        .await;
    other
        .eval("document.getElementById('pow-cancel').click(), true")
        .await;
    other
        .wait_for("document.getElementById('pow').hidden", 5)
        .await;
    assert_eq!(
        other
            .eval("document.getElementById('new-room').disabled")
            .await,
        json!(false)
    );
    assert_eq!(app.state.metrics.rooms_created_total.get(), 0);
}

/// Where the message box, the status line and the conversation's scroll position are.
async fn layout(page: &Page<'_>) -> serde_json::Value {
    page.eval(
        "(() => { const s = document.getElementById('scroller'); \
         return { composer_bottom: document.getElementById('text').getBoundingClientRect().bottom, \
         status_top: document.getElementById('status').getBoundingClientRect().top, \
         height: window.innerHeight, page_scrolls: document.documentElement.scrollHeight > window.innerHeight, \
         top: s.scrollTop, at_end: s.scrollHeight - s.scrollTop - s.clientHeight < 2, \
         jump: !document.getElementById('jump').hidden }; })()",
    )
    .await
}

/// The top of the message with this text, relative to the window.
async fn top_of(page: &Page<'_>, text: &str) -> f64 {
    page.eval(&format!(
        "[...document.querySelectorAll('#messages li')].find(li => \
         li.querySelector('.text').textContent === {text:?}).getBoundingClientRect().top"
    ))
    .await
    .as_f64()
    .unwrap()
}

#[actix_web::test]
async fn a_long_conversation_keeps_the_message_box_on_screen_and_the_readers_place() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, _) = two_people(&browser, &app).await;
    bob.set_viewport(390, 760).await;
    for i in 1..=30 {
        say(&alice, &format!("line {i} of a long conversation")).await;
    }
    wait_for_text(&bob, "line 30 of a long conversation").await;
    // Only the conversation scrolls: the message box and the status stay on screen, and the
    // newest message is in view.
    let l = layout(&bob).await;
    assert_eq!(l["page_scrolls"], json!(false), "{l}");
    assert!(
        l["composer_bottom"].as_f64().unwrap() <= l["height"].as_f64().unwrap(),
        "{l}"
    );
    assert!(l["status_top"].as_f64().unwrap() >= 0.0, "{l}");
    assert_eq!(l["at_end"], json!(true), "{l}");
    assert_eq!(l["jump"], json!(false), "{l}");
    // His keyboard opens (the screen's height shrinks): the newest line stays in view, and the
    // share box gives up its label and warning for the conversation's room.
    bob.set_viewport(390, 420).await;
    bob.wait_for(
        "(() => { const s = document.getElementById('scroller'); \
         return s.scrollHeight - s.scrollTop - s.clientHeight < 2; })()",
        5,
    )
    .await;
    assert!(
        layout(&bob).await["composer_bottom"].as_f64().unwrap() <= 420.0,
        "the message box is still on screen"
    );
    assert_eq!(
        bob.eval("document.getElementById('scroller').clientHeight >= 150")
            .await,
        json!(true),
        "the conversation keeps most of a short screen"
    );
    bob.set_viewport(390, 760).await;

    // Bob scrolls up to read; a new message does not pull him down, it offers a way there.
    bob.eval("document.getElementById('scroller').scrollTop = 0, true")
        .await;
    let before = top_of(&bob, "line 1 of a long conversation").await;
    say(&alice, "are you still there?").await;
    wait_for_text(&bob, "are you still there?").await;
    let l = layout(&bob).await;
    assert_eq!(l["top"], json!(0), "{l}");
    assert_eq!(l["jump"], json!(true), "{l}");
    assert_eq!(top_of(&bob, "line 1 of a long conversation").await, before);
    bob.eval("document.getElementById('jump').click(), true")
        .await;
    let l = layout(&bob).await;
    assert_eq!(l["at_end"], json!(true), "{l}");
    assert_eq!(l["jump"], json!(false), "{l}");

    // What Bob writes himself is always shown, wherever he was reading.
    bob.eval("document.getElementById('scroller').scrollTop = 0, true")
        .await;
    say(&bob, "yes, reading back").await;
    wait_for_text(&alice, "yes, reading back").await;
    assert_eq!(layout(&bob).await["at_end"], json!(true));

    // While Bob looks at another tab, the tab's title counts what arrives.
    bob.open_tab_in_front().await;
    say(&alice, "one").await;
    say(&alice, "two").await;
    bob.wait_for("document.title === '(2) NanoChat'", 10).await;
    bob.bring_to_front().await;
    bob.wait_for("document.title === 'NanoChat'", 10).await;
    assert_same_origin(&bob, &app);
}

/// Send "line N" for each N in `lines` from a Rust client, each acked before the next.
async fn write_lines(
    writer: &mut Client,
    s: &mut RoomSession,
    lines: std::ops::RangeInclusive<u32>,
) {
    for i in lines {
        send_acked(writer, s, "writer", &format!("line {i}")).await;
    }
}

/// The numbers of the "line N" messages shown, in order.
async fn line_numbers(page: &Page<'_>) -> Vec<u32> {
    texts_of(page)
        .await
        .iter()
        .map(|t| t.strip_prefix("line ").unwrap().parse().unwrap())
        .collect()
}

#[actix_web::test]
async fn a_page_left_open_keeps_the_newest_thousand_messages_and_pages_back_the_rest() {
    let app = spawn_app(Backend::Sqlite).await;
    let (mut writer, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    let browser = Browser::launch().await;
    let page = browser
        .new_page(&format!("{}/#{}", origin(&app), b64u(keys.secret())))
        .await;
    wait_online(&page).await;
    page.set_viewport(390, 760).await;
    // A reader at the end: past 1 100 messages the oldest go, down to 1 000, and the way back
    // to them appears.
    write_lines(&mut writer, &mut s, 1..=1150).await;
    wait_for_text(&page, "line 1150").await;
    let lines = line_numbers(&page).await;
    assert_eq!(
        lines.len(),
        1049,
        "forgotten down to 1 000 at 1 101, then 49 more"
    );
    assert_eq!(lines, (102..=1150).collect::<Vec<_>>());
    assert_eq!(
        page.eval("!document.getElementById('older').hidden").await,
        json!(true)
    );
    // A reader scrolled up loses nothing while reading, and what they read stays in place.
    page.eval("document.getElementById('scroller').scrollTop = 0, true")
        .await;
    let before = top_of(&page, "line 102").await;
    write_lines(&mut writer, &mut s, 1151..=1250).await;
    wait_for_text(&page, "line 1250").await;
    assert_eq!(line_numbers(&page).await, (102..=1250).collect::<Vec<_>>());
    assert_eq!(top_of(&page, "line 102").await, before);
    // The forgotten ones page back in, in order (and pass the replay rule again).
    page.eval("document.getElementById('older').click(), true")
        .await;
    wait_for_text(&page, "line 52").await;
    assert_eq!(line_numbers(&page).await, (52..=1250).collect::<Vec<_>>());
    // Back at the end, the next message makes the page forget down to 1 000 again.
    page.eval("document.getElementById('jump').click(), true")
        .await;
    write_lines(&mut writer, &mut s, 1251..=1251).await;
    wait_for_text(&page, "line 1251").await;
    assert_eq!(line_numbers(&page).await, (252..=1251).collect::<Vec<_>>());
    assert_eq!(
        page.eval(
            "(() => { const s = document.getElementById('scroller'); \
             return s.scrollHeight - s.scrollTop - s.clientHeight < 2; })()"
        )
        .await,
        json!(true),
        "the newest message is in view"
    );
}

#[actix_web::test]
async fn web_addresses_in_messages_become_links_that_open_elsewhere() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, _) = two_people(&browser, &app).await;
    let text = "see https://example.org/a?b=1&c=<2>. and (http://example.net/wiki/X_(y)), \
                not javascript:alert(1) nor http://. nor <b>bold</b>";
    say(&alice, text).await;
    wait_for_text(&bob, text).await;
    let links = bob
        .eval(
            "[...document.querySelectorAll('#messages .text a')].map(a => \
             [a.href, a.textContent, a.target, a.rel])",
        )
        .await;
    assert_eq!(
        links,
        json!([
            [
                "https://example.org/a?b=1&c=",
                "https://example.org/a?b=1&c=",
                "_blank",
                "noopener noreferrer nofollow"
            ],
            [
                "http://example.net/wiki/X_(y)",
                "http://example.net/wiki/X_(y)",
                "_blank",
                "noopener noreferrer nofollow"
            ],
        ])
    );
    // Everything else stays text: no element but the two links.
    assert_eq!(
        bob.eval("document.querySelector('#messages .text').children.length")
            .await,
        json!(2)
    );
    // And should a future change put a string into HTML, the page's Trusted Types policy makes
    // that an error: no HTML sink takes a string, no other policy can be made, and the one
    // policy there is admits only the proof-of-work worker's URL.
    let refused = bob
        .eval(
            "(() => { const tries = [ \
               () => { document.body.insertAdjacentHTML('beforeend', '<img src=x>'); }, \
               () => { document.createElement('div').innerHTML = '<b>x</b>'; }, \
               () => { trustedTypes.createPolicy('other', { createHTML: s => s }); }, \
               () => { new Worker('data:text/javascript,1'); } ]; \
             return tries.map(t => { try { t(); return false; } catch { return true; } }); })()",
        )
        .await;
    assert_eq!(refused, json!([true, true, true, true]));
}

#[actix_web::test]
async fn a_page_without_https_or_without_javascript_says_what_it_needs() {
    let app = spawn_app(Backend::Sqlite).await;
    // A name that is not this machine's own (as a LAN address or a domain would be): over plain
    // http the page is not a secure context, and browsers then offer no WebCrypto.
    let browser =
        Browser::launch_with(&["--host-resolver-rules=MAP insecure.test 127.0.0.1"]).await;
    let secret = b64u(crate::helpers::random_room().secret());
    let page = browser
        .new_page(&format!("http://insecure.test:{}/#{secret}", app.port))
        .await;
    page.wait_for("!document.getElementById('notice').hidden", 10)
        .await;
    let notice = page
        .eval("document.getElementById('notice').textContent")
        .await;
    assert!(notice.as_str().unwrap().contains("https://"), "{notice}");
    assert_eq!(page.eval("isSecureContext").await, json!(false));
    assert_eq!(
        page.eval("document.getElementById('new-room').disabled")
            .await,
        json!(true)
    );
    for line in page.logs() {
        assert!(!line.starts_with("exception"), "{line}");
    }
    assert!(
        page.requests().iter().all(|url| !url.starts_with("ws")),
        "{:?}",
        page.requests()
    );

    // With JavaScript off, the page says it needs it; with it on, that text is not shown.
    let plain = origin(&app);
    let off = browser.new_page("about:blank").await;
    off.disable_javascript().await;
    off.goto(&format!("{plain}/")).await;
    assert_eq!(
        off.eval("document.querySelector('noscript .notice')?.offsetHeight > 0")
            .await,
        json!(true)
    );
    let on = browser.new_page(&format!("{plain}/")).await;
    assert_eq!(
        on.eval("document.querySelector('noscript .notice') === null")
            .await,
        json!(true)
    );
}

/// A TCP relay to the test server whose open connections can be frozen: from then on they
/// pass nothing (either way, or only the server's answers) and are never closed, as a path
/// that died while a laptop slept. Connections made later pass as usual. It can also hold
/// what browsers send after their request head, as a slow path would, until released.
struct Relay {
    port: u16,
    /// Generations of the client-to-server and server-to-client directions; a connection
    /// passes bytes in a direction while that direction's generation is the one it was born in.
    generations: Arc<[AtomicU64; 2]>,
    /// While set, connections made hold what the browser sends after its request head.
    hold: Arc<AtomicBool>,
    /// Bytes from a browser held back so far.
    held: Arc<AtomicUsize>,
    /// The tasks that carry each connection's two directions, to end them all at once.
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay {
            port,
            generations: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
            hold: Arc::default(),
            held: Arc::default(),
            tasks: Arc::default(),
        };
        let (current, hold, held, tasks) = (
            relay.generations.clone(),
            relay.hold.clone(),
            relay.held.clone(),
            relay.tasks.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let directions: [(_, Box<dyn tokio::io::AsyncWrite + Unpin + Send>); 2] = [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(sw),
                    ),
                    (Box::new(sr), Box::new(cw)),
                ];
                for (direction, (mut from, mut to)) in directions.into_iter().enumerate() {
                    let (current, hold, held) = (current.clone(), hold.clone(), held.clone());
                    let born = current[direction].load(Ordering::SeqCst);
                    // The request head read so far, while this connection still passes it.
                    let mut head = (direction == 0 && hold.load(Ordering::SeqCst)).then(Vec::new);
                    let task = tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                        let live = || current[direction].load(Ordering::SeqCst) == born;
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut holding = false;
                        while let Ok(n @ 1..) = from.read(&mut buf).await {
                            let mut chunk = &buf[..n];
                            if let Some(seen) = head.as_mut() {
                                let before = seen.len();
                                seen.extend_from_slice(chunk);
                                if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                                    let (passed, rest) = chunk.split_at(end + 4 - before);
                                    if live() && to.write_all(passed).await.is_err() {
                                        break;
                                    }
                                    chunk = rest;
                                    head = None;
                                    holding = true;
                                }
                            }
                            if holding && !chunk.is_empty() && hold.load(Ordering::SeqCst) {
                                held.fetch_add(chunk.len(), Ordering::SeqCst);
                                while hold.load(Ordering::SeqCst) {
                                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                                }
                            }
                            if live() && to.write_all(chunk).await.is_err() {
                                break;
                            }
                        }
                        // Frozen connections are held open: only a live one passes its end on.
                        if !live() {
                            std::future::pending::<()>().await;
                        }
                    });
                    tasks.lock().unwrap().push(task.abort_handle());
                }
            }
        });
        relay
    }

    /// Open connections pass nothing more, either way.
    fn freeze(&self) {
        for g in self.generations.iter() {
            g.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Open connections still carry what the browser sends, but no answer comes back.
    fn freeze_answers(&self) {
        self.generations[1].fetch_add(1, Ordering::SeqCst);
    }

    /// Connections made from now on pass the browser's request head (a WebSocket's upgrade)
    /// and the server's answers, but hold what the browser sends after it until `release`.
    fn hold_requests(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Close every connection made so far, both ways, as a restarting proxy would: the browser
    /// learns at once and reconnects (through the relay again).
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Pass on everything held, and hold nothing more.
    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    /// Bytes a browser sent that are being held (or were, before `release`).
    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

#[actix_web::test]
async fn a_connection_that_died_silently_is_noticed_and_nothing_is_lost() {
    let app = spawn_app(Backend::Sqlite).await;
    let relay = Relay::start(app.port).await;
    let browser = Browser::launch().await;
    let alice = browser.new_page(&format!("{}/", origin(&app))).await;
    set_nick(&alice, "alice").await;
    let link = create_room(&alice).await;
    let fragment = link.split_once('#').unwrap().1;
    let bob = browser
        .new_page(&format!("http://127.0.0.1:{}/#{fragment}", relay.port))
        .await;
    set_nick(&bob, "bob").await;
    wait_online(&bob).await;

    // Bob's path dies without a close. Alice writes; Bob writes and gets no ack: within 10 s
    // his page gives the socket up, reconnects, catches up and sends again.
    relay.freeze();
    say(&alice, "while you were away").await;
    say(&bob, "are you there?").await;
    wait_for_text(&alice, "are you there?").await;
    wait_for_text(&bob, "while you were away").await;
    wait_all_sent(&bob, 10).await;

    // Dead again, and Bob sends nothing: once the socket has been quiet a while, coming back
    // to the tab probes it, and the page reconnects and shows what was missed.
    relay.freeze();
    say(&alice, "second time away").await;
    tokio::time::sleep(std::time::Duration::from_secs(16)).await;
    assert!(
        !shown(&bob)
            .await
            .iter()
            .any(|(_, t)| t == "second time away")
    );
    bob.open_tab_in_front().await;
    bob.bring_to_front().await;
    wait_for_text(&bob, "second time away").await;
    wait_online(&bob).await;

    // Now Bob's messages still reach the server, but no answer comes back: stored, their acks
    // lost. After the reconnect his page reads them back, counts them as sent and shows each
    // once; what he writes next goes through.
    relay.freeze_answers();
    say(&bob, "did this arrive?").await;
    wait_for_text(&alice, "did this arrive?").await;
    say(&bob, "and this?").await;
    wait_for_text(&alice, "and this?").await;
    wait_online_within(&bob, 30).await;
    wait_all_sent(&bob, 20).await;
    say(&bob, "back for good").await;
    wait_for_text(&alice, "back for good").await;

    let all = vec![
        "while you were away",
        "are you there?",
        "second time away",
        "did this arrive?",
        "and this?",
        "back for good",
    ];
    let texts = texts_of(&alice).await;
    assert_eq!(texts, all, "each message once");
    wait_for_text(&bob, "back for good").await;
    let texts = texts_of(&bob).await;
    assert_eq!(texts, all, "each message once");
    assert_eq!(
        bob.eval("document.getElementById('notice').hidden").await,
        json!(true),
        "no notice about a replay"
    );
}

#[actix_web::test]
async fn a_creation_refused_for_want_of_work_does_the_work_and_goes_on() {
    // No work while the server is calm; more once rooms are created faster than 60 a minute.
    let app = spawn_app_with(Backend::Sqlite, work_rising_after_a_few_creations).await;
    let relay = Relay::start(app.port).await;
    let browser = Browser::launch().await;
    let page = browser
        .new_page(&format!("http://127.0.0.1:{}/", relay.port))
        .await;
    // The page is told no work is needed, and its `create` is slow to reach the server...
    relay.hold_requests();
    page.eval("document.getElementById('new-room').click(), true")
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while relay.held() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the page sent no create"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // ... while others create rooms fast enough that the server now asks for work.
    while app.state.pow.required(false) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the work asked never rose"
        );
        app.room_creator().await;
    }
    let refused = || app.rejected("pow_required");
    let (created, refused_before) = (app.state.metrics.rooms_created_total.get(), refused());
    relay.release();
    // Refused with `pow_required`, the page asks for a token, does the work and is in its room.
    wait_online(&page).await;
    page.wait_for("location.hash.length === 44", 10).await;
    assert_eq!(app.state.metrics.rooms_created_total.get(), created + 1);
    assert_eq!(
        refused(),
        refused_before + 1,
        "the page's first create was refused for want of work"
    );
    assert_eq!(
        page.eval("document.getElementById('notice').hidden").await,
        json!(true),
        "nothing left to tell"
    );
}

#[actix_web::test]
async fn sends_refused_for_now_go_again_by_themselves() {
    // Two messages at once per room, then two a second.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.room_messages = Rate::new(120, 2);
    })
    .await;
    let browser = Browser::launch().await;
    let (alice, bob, _) = two_people(&browser, &app).await;
    for i in 1..=5 {
        say(&bob, &format!("quick {i}")).await;
    }
    // Three were refused with `rate_limited` at first; nobody clicks anything.
    bob.wait_for(
        "(() => { const own = [...document.querySelectorAll('#messages li.own')]; \
         return own.length === 5 && own.every(li => li.dataset.status === 'sent'); })()",
        20,
    )
    .await;
    alice
        .wait_for("document.querySelectorAll('#messages li').length === 5", 10)
        .await;
    let mut texts = texts_of(&alice).await;
    texts.sort();
    assert_eq!(
        texts,
        (1..=5).map(|i| format!("quick {i}")).collect::<Vec<_>>()
    );
    assert_eq!(bob.count("#messages li.failed").await, 0);
    let refused = app.refused("room_messages");
    assert!(refused >= 3, "{refused} refusals");
}

#[actix_web::test]
async fn look_alike_nicknames_show_in_other_colours_and_a_name_in_one_colour_everywhere() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, _) = two_people(&browser, &app).await;
    let lines = [
        ("alice", "the real one"),
        ("\u{430}lice", "a Cyrillic а"),
        ("alice\u{200b}", "an invisible character"),
        ("alice", "the same name again"),
    ];
    say(&alice, lines[0].1).await;
    wait_for_text(&bob, lines[0].1).await;
    for (nick, text) in &lines[1..] {
        set_nick(&bob, nick).await;
        say(&bob, text).await;
        wait_for_text(&alice, text).await;
    }
    wait_all_sent(&bob, 10).await;
    let colours = async |page: &Page<'_>| -> Vec<(String, String)> {
        serde_json::from_value(
            page.eval(
                "[...document.querySelectorAll('#messages .nick')] \
                 .map(n => [n.textContent, getComputedStyle(n).color])",
            )
            .await,
        )
        .unwrap()
    };
    let seen = colours(&alice).await;
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, lines.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    let real = &seen[0].1;
    assert_ne!(&seen[1].1, real, "{seen:?}");
    assert_ne!(&seen[2].1, real, "{seen:?}");
    assert_eq!(&seen[3].1, real, "{seen:?}");
    // The writer's own page shows each name in the same colour.
    assert_eq!(colours(&bob).await, seen);
}

#[actix_web::test]
async fn a_nickname_cannot_reorder_the_message_after_it() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, _) = two_people(&browser, &app).await;
    // A right-to-left override in a nickname, never closed: unisolated, it would run on into
    // the message and show "pay 100" as "001 yap".
    set_nick(&alice, "\u{202e}mallory").await;
    say(&alice, "pay 100").await;
    wait_for_text(&bob, "pay 100").await;
    let order = bob
        .eval(
            "(() => { const text = [...document.querySelectorAll('#messages .text')].find(t => \
             t.textContent === 'pay 100'); const r = document.createRange(); \
             const node = text.firstChild; \
             r.setStart(node, 0); r.setEnd(node, 1); const p = r.getBoundingClientRect().left; \
             r.setStart(node, 6); r.setEnd(node, 7); const zero = r.getBoundingClientRect().left; \
             return p < zero; })()",
        )
        .await;
    assert_eq!(order, json!(true), "the message reads left to right");
}

/// Alice creates a room and Bob opens it through `relay`, which then freezes: his page has
/// not noticed yet when `texts` are stored (by "carol", straight into the store: no socket, no
/// limit).
async fn missed_while_away<'a>(
    browser: &'a Browser,
    app: &TestApp,
    relay: &Relay,
    texts: impl Iterator<Item = String>,
) -> (Page<'a>, Page<'a>) {
    let alice = browser.new_page(&format!("{}/", origin(app))).await;
    let link = create_room(&alice).await;
    let fragment = link.split_once('#').unwrap().1;
    let bob = browser
        .new_page(&format!("http://127.0.0.1:{}/#{fragment}", relay.port))
        .await;
    wait_online(&bob).await;
    relay.freeze();
    let keys = keys_of(&link);
    let mut s = RoomSession::new(keys.clone());
    let missed: Vec<_> = texts
        .map(|text| {
            let sealed = s.seal("carol", &text);
            nanochat::store::NewMessage {
                room: keys.room_id,
                epoch: sealed.epoch,
                iv: sealed.iv,
                ct: sealed.ct,
            }
        })
        .collect();
    app.state
        .store
        .append(&missed, nanochat::store::now_ms())
        .await
        .unwrap();
    (alice, bob)
}

#[actix_web::test]
async fn a_catch_up_refused_for_now_goes_on_when_the_server_says() {
    // Pages of two messages, and one frame a second per socket: after a reconnect, the page's
    // request for the rest of what it missed comes right after its join, and is refused.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.history = 2;
        s.limits.frames_per_second = 1;
        s.limits.frames_burst = 1;
    })
    .await;
    let relay = Relay::start(app.port).await;
    let browser = Browser::launch().await;
    let (alice, bob) = missed_while_away(
        &browser,
        &app,
        &relay,
        (1..=12).map(|i| format!("missed {i}")),
    )
    .await;
    let refused = || app.refused("socket_frames");
    assert_eq!(refused(), 0);
    // Bob writes on his dead socket: no ack, so his page reconnects, catches up page by page
    // (refused now and then with `rate_limited`, asked again when told) and then sends.
    say(&bob, "I am back").await;
    wait_for_text(&alice, "I am back").await;
    bob.wait_for(
        "document.querySelectorAll('#messages li').length === 13",
        30,
    )
    .await;
    let texts = texts_of(&bob).await;
    let missed: Vec<String> = (1..=12).map(|i| format!("missed {i}")).collect();
    assert_eq!(texts[..12], missed[..]);
    assert_eq!(texts[12], "I am back");
    assert!(refused() > 0, "the catch-up met the frame limit");
}

#[actix_web::test]
async fn a_long_catch_up_keeps_to_the_read_limit_instead_of_being_refused_page_after_page() {
    // 200 messages a second may be read, 400 at once; joins return 100 and pages ask for 200.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_reads = Rate::new(12_000, 400);
        s.limits.strike_budget = 40;
    })
    .await;
    let relay = Relay::start(app.port).await;
    let browser = Browser::launch().await;
    let (alice, bob) = missed_while_away(
        &browser,
        &app,
        &relay,
        (1..=1500).map(|i| format!("line {i}")),
    )
    .await;
    let refused = || app.refused("client_reads");
    // Bob writes on his dead socket; his page reconnects and catches up: the join and a page
    // fit the burst, the next page is refused, and from then on the page waits as long as the
    // refusals added up to, instead of asking again at once and being refused every other time.
    say(&bob, "line 1501").await;
    // (10 s until the dead socket is given up, then seven pages about a second apart; the
    // page decrypts and lays out 1 500 messages meanwhile, slow on a busy machine.)
    alice
        .wait_for(
            "[...document.querySelectorAll('#messages .text')].some(t => t.textContent === 'line 1501')",
            90,
        )
        .await;
    wait_all_sent(&bob, 10).await;
    let lines = line_numbers(&bob).await;
    let first = 1502 - lines.len() as u32;
    assert!((1000..=1100).contains(&lines.len()), "{}", lines.len());
    assert_eq!(lines, (first..=1501).collect::<Vec<_>>());
    assert!(
        (1..=3).contains(&refused()),
        "{} catch-up pages refused",
        refused()
    );
    assert_eq!(app.state.metrics.abuse_disconnects_total.get(), 0);
}

#[actix_web::test]
async fn a_page_far_behind_shows_the_newest_messages_instead_of_reading_everything_missed() {
    let app = spawn_app(Backend::Sqlite).await;
    let relay = Relay::start(app.port).await;
    let browser = Browser::launch().await;
    let (alice, bob) = missed_while_away(
        &browser,
        &app,
        &relay,
        (1..=3000).map(|i| format!("line {i}")),
    )
    .await;
    let reads = || app.state.metrics.history_query_seconds.get_sample_count();
    let before = reads();
    // Bob's connection is closed while he looks at another tab (he had nothing in flight): his
    // page reconnects, learns it is 3 000 messages behind, and shows the newest 200 with the
    // way to older ones; the tab's title counts what is there to read.
    bob.open_tab_in_front().await;
    relay.cut();
    wait_for_text(&bob, "line 3000").await;
    wait_online(&bob).await;
    assert_eq!(bob.eval("document.title").await, json!("(200) NanoChat"));
    bob.bring_to_front().await;
    assert_eq!(line_numbers(&bob).await, (2801..=3000).collect::<Vec<_>>());
    assert_eq!(
        bob.eval("!document.getElementById('older').hidden").await,
        json!(true)
    );
    // Three reads (the join's page, the newest message, the newest page), not sixteen.
    assert_eq!(reads() - before, 3);
    bob.eval("document.getElementById('older').click(), true")
        .await;
    wait_for_text(&bob, "line 2751").await;
    assert_eq!(line_numbers(&bob).await, (2751..=3000).collect::<Vec<_>>());
    // And the conversation goes on both ways. (Alice, whose socket stayed open, first gets the
    // 3 000 stored behind the server's back: the room delivers them in order before "back",
    // which takes long on a busy machine.)
    say(&bob, "back").await;
    alice
        .wait_for(
            "[...document.querySelectorAll('#messages .text')].some(t => t.textContent === 'back')",
            90,
        )
        .await;
    say(&alice, "welcome back").await;
    wait_for_text(&bob, "welcome back").await;
}

#[actix_web::test]
async fn a_join_refused_for_now_is_tried_again_when_the_server_says() {
    // Every page here comes from 127.0.0.1, one client: two frames at once, then one every ten
    // seconds.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_frames = Rate::new(6, 2);
    })
    .await;
    let browser = Browser::launch().await;
    let (_alice, _bob, link) = two_people(&browser, &app).await;
    // Alice's create and Bob's join used the budget: Carol's join is refused at first, and
    // her page joins by itself a moment later.
    let carol = browser.new_page(&link).await;
    wait_online_within(&carol, 30).await;
    assert!(app.refused("client_frames") > 0);
    carol
        .wait_for("document.getElementById('notice').hidden", 5)
        .await;
}

#[actix_web::test]
async fn a_message_too_long_to_send_stays_in_the_box_to_be_shortened() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, _) = two_people(&browser, &app).await;
    let long = "x".repeat(9_000);
    say(&bob, &long).await;
    bob.wait_for("!document.getElementById('notice').hidden", 10)
        .await;
    let notice = bob
        .eval("document.getElementById('notice').textContent")
        .await;
    let notice = notice.as_str().unwrap();
    assert!(notice.contains("too long"), "{notice}");
    // It was not sent: nothing new in either window, and the text is still there to edit.
    assert_eq!(
        bob.eval("document.getElementById('text').value.length")
            .await,
        json!(9_000)
    );
    assert!(shown(&bob).await.is_empty());
    // Shortened by as much as the notice said, it goes, and the notice goes away.
    let over: usize = notice
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("the notice says by how much");
    say(&bob, &"x".repeat(9_000 - over)).await;
    wait_for_text(&alice, &"x".repeat(9_000 - over)).await;
    bob.wait_for("document.getElementById('notice').hidden", 10)
        .await;
    assert_eq!(shown(&alice).await.len(), 1);
    assert_eq!(app.state.metrics.messages_stored_total.get(), 1);
}

/// Serve one plain page (no Content-Security-Policy) for every request, from another port of
/// this host: another origin, as a foreign site would be. Returns the page's origin.
/// A page whose `Date` is `ms` off, opened at `url`.
async fn page_with_clock_off<'a>(browser: &'a Browser, url: &str, ms: i64) -> Page<'a> {
    let page = browser.new_page_running(url, &clock_off_by(ms)).await;
    // Really off: the page's clock is not the test's.
    let off = page.eval("Date.now()").await.as_i64().unwrap() - nanochat::store::now_ms();
    assert!(
        (off - ms).abs() < 60_000,
        "the page's clock is {off} ms off"
    );
    page
}

#[actix_web::test]
async fn people_whose_clocks_are_days_off_can_still_chat() {
    const DAY: i64 = 86_400_000;
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    // The server takes a send only within a day of its own epoch; these clocks are further off,
    // and TLS would not mind (a certificate is valid for months).
    let alice = page_with_clock_off(&browser, &format!("{}/", origin(&app)), 3 * DAY).await;
    set_nick(&alice, "alice").await;
    let link = create_room(&alice).await;
    let bob = page_with_clock_off(&browser, &link, -2 * DAY).await;
    set_nick(&bob, "bob").await;
    wait_online(&bob).await;

    say(&alice, "from three days ahead").await;
    say(&bob, "from two days behind").await;
    wait_for_text(&bob, "from three days ahead").await;
    wait_for_text(&alice, "from two days behind").await;
    wait_all_sent(&alice, 10).await;
    wait_all_sent(&bob, 10).await;
    for page in [&alice, &bob] {
        assert_eq!(page.count("#messages li.failed").await, 0);
        // Every message is from today by the server's clock, so it shows a time without a
        // date (the page's own clock would call them days old, or days ahead).
        let dated = page
            .eval(
                "(() => { const month = new (Object.getPrototypeOf(Date))() \
                   .toLocaleString([], { month: 'short' }); \
                 return [...document.querySelectorAll('#messages .meta')] \
                   .map(m => m.textContent).filter(t => t.includes(month)); })()",
            )
            .await;
        assert_eq!(dated, json!([]), "times shown with a date");
    }
    // Stored under the server's epoch, readable by anyone with the link.
    let keys = keys_of(&link);
    let mut reader = app.client().await;
    let ServerFrame::Joined { messages, .. } = reader.join(&keys, None).await.unwrap() else {
        panic!("not joined");
    };
    let today = crypto::epoch_of(nanochat::store::now_ms());
    assert_eq!(messages.len(), 2);
    for m in &messages {
        assert!(
            m.epoch.abs_diff(today) <= 1,
            "epoch {} today {today}",
            m.epoch
        );
    }
}

/// Every system notification the page asks for, as `window.shown`: `{via, title, body, tag,
/// data, closed, done}`, `via` saying who made it: `"page"` (`new Notification`) or `"worker"`
/// (its service worker's registration; `done` once the browser says it is shown). The real
/// browser still shows each one.
const RECORD_NOTIFICATIONS: &str = "(() => { window.shown = []; const Real = window.Notification; \
    class Recorded extends Real { constructor(title, options) { super(title, options); \
      const seen = { via: 'page', title, body: options?.body, tag: options?.tag, closed: false }; \
      window.shown.push(seen); const close = this.close.bind(this); \
      this.close = () => { seen.closed = true; close(); }; } } \
    window.Notification = Recorded; \
    const proto = globalThis.ServiceWorkerRegistration?.prototype; if (!proto) return; \
    const show = proto.showNotification; \
    proto.showNotification = function (title, options) { const seen = { via: 'worker', \
      title, body: options?.body, tag: options?.tag, data: options?.data, done: false }; \
      window.shown.push(seen); const made = show.call(this, title, options); \
      made.then(() => { seen.done = true; }, () => {}); return made; }; })()";

/// Once the page's last notification is shown: Chromium may leave out of `getNotifications()`
/// a notification one tab shows while another tab asks for the list.
async fn wait_shown(page: &Page<'_>, body: &str) {
    page.wait_for(
        &format!("window.shown.some(n => n.body === {body:?} && n.done)"),
        10,
    )
    .await;
}

/// The notifications of this page's site that the browser shows now (made by its service worker).
async fn shown_by_the_worker(page: &Page<'_>) -> serde_json::Value {
    page.eval(
        "navigator.serviceWorker.getRegistration().then(r => r ? r.getNotifications() : []) \
         .then(all => all.map(n => ({ title: n.title, body: n.body, tag: n.tag, data: n.data })))",
    )
    .await
}

/// Wait until the notifications the browser shows for the page's site (made by its service
/// worker), as `all`, make `test` true.
async fn wait_worker_shows(page: &Page<'_>, test: &str) {
    page.wait_for(
        &format!(
            "navigator.serviceWorker.getRegistration().then(r => r ? r.getNotifications() : []) \
             .then(all => {test})"
        ),
        10,
    )
    .await;
}

/// The notify worker's URL on `app`.
fn notify_worker(app: &TestApp) -> String {
    format!("{}/notify-worker.js", origin(app))
}

/// Click "Notify me" and wait until the page says it is on.
async fn turn_notifications_on(page: &Page<'_>) {
    page.eval("document.getElementById('notify').click(), true")
        .await;
    page.wait_for(
        "document.getElementById('notify').getAttribute('aria-pressed') === 'true'",
        10,
    )
    .await;
}

async fn notify_pressed(page: &Page<'_>) -> serde_json::Value {
    page.eval("document.getElementById('notify').getAttribute('aria-pressed')")
        .await
}

async fn notifications(page: &Page<'_>) -> serde_json::Value {
    page.eval("window.shown ?? []").await
}

/// Every notification the page made so far was made `via` the page or its worker.
async fn all_made_by(page: &Page<'_>, via: &str) {
    let made = notifications(page).await;
    let all = made.as_array().expect("a list");
    assert!(all.iter().all(|n| n["via"] == json!(via)), "{made}");
}

/// The start page of `app`, its notifications recorded and allowed (as after "Allow").
async fn page_allowed_to_notify<'b>(browser: &'b Browser, app: &TestApp) -> Page<'b> {
    let page = browser
        .new_page_running(&format!("{}/", origin(app)), RECORD_NOTIFICATIONS)
        .await;
    page.grant("notifications", &origin(app)).await;
    page
}

#[actix_web::test]
async fn notifications_when_asked_for_say_how_many_and_never_who_or_what() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let alice = page_allowed_to_notify(&browser, &app).await;
    set_nick(&alice, "alice").await;
    let link = create_room(&alice).await;
    let bob = browser.new_page(&link).await;
    set_nick(&bob, "bob").await;
    wait_online(&bob).await;
    assert_eq!(
        notify_pressed(&alice).await,
        json!("false"),
        "off until asked for"
    );

    // Not asked for: a hidden tab counts in its title only.
    alice.open_tab_in_front().await;
    say(&bob, "before asking").await;
    alice
        .wait_for("document.title === '(1) NanoChat'", 10)
        .await;
    assert_eq!(notifications(&alice).await, json!([]));
    alice.bring_to_front().await;

    turn_notifications_on(&alice).await;
    // The choice is this device's: it stays after a reload.
    alice.reload().await;
    wait_online(&alice).await;
    assert_eq!(notify_pressed(&alice).await, json!("true"));

    alice.open_tab_in_front().await;
    say(&bob, "the meeting moved to the old mill").await;
    say(&bob, "bring the papers").await;
    alice
        .wait_for("window.shown.some(n => n.body === '2 new messages')", 10)
        .await;
    let notes = notifications(&alice).await;
    let notes = notes.as_array().unwrap();
    let tag = json!(format!("nanochat-{}", b64u(&keys_of(&link).room_id)));
    for n in notes {
        // Made through the page's service worker where there is one.
        assert_eq!(n["via"], json!("worker"), "{n}");
        assert_eq!(n["title"], json!("NanoChat"));
        assert!(
            [json!("1 new message"), json!("2 new messages")].contains(&n["body"]),
            "{n}"
        );
        // One per room, each replacing the last; nothing of who or what. The data the worker
        // gets is the tab's token, nothing else.
        assert_eq!(n["tag"], tag);
        let data = n["data"].as_object().expect("data");
        assert_eq!(data.keys().collect::<Vec<_>>(), ["tab"], "{n}");
        let text = n.to_string();
        for secret in ["bob", "mill", "papers"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
    // The browser shows one: the last, which replaced the first.
    wait_shown(&alice, "2 new messages").await;
    wait_worker_shows(
        &alice,
        "all.length === 1 && all[0].body === '2 new messages'",
    )
    .await;
    let now_shown = shown_by_the_worker(&alice).await;
    assert_eq!(now_shown[0]["tag"], tag, "{now_shown}");
    // Seen: the notification goes.
    alice.bring_to_front().await;
    wait_worker_shows(&alice, "all.length === 0").await;

    // Turned off again: nothing more is shown, and the worker is gone.
    alice
        .eval("document.getElementById('notify').click(), true")
        .await;
    assert_eq!(notify_pressed(&alice).await, json!("false"));
    alice
        .wait_for(
            "navigator.serviceWorker.getRegistrations().then(all => all.length === 0)",
            10,
        )
        .await;
    let before = notes.len();
    alice.open_tab_in_front().await;
    say(&bob, "after turning off").await;
    alice
        .wait_for("document.title === '(1) NanoChat'", 10)
        .await;
    assert_eq!(
        notifications(&alice).await.as_array().unwrap().len(),
        before
    );
    // Bob never asked: he never gets one.
    assert_eq!(notifications(&bob).await, json!([]));
}

/// The text of the one QR code in a PNG, read by a real decoder (rqrr) as a camera app would.
fn read_qr(image: &[u8]) -> String {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(image));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a sane size")];
    let frame = reader.next_frame(&mut pixels).expect("its pixels");
    let channels = frame.color_type.samples();
    let (width, height) = (frame.width as usize, frame.height as usize);
    let mut prepared = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| {
        let at = y * frame.line_size + x * channels;
        let rgb = &pixels[at..at + channels.min(3)];
        (rgb.iter().map(|&v| u32::from(v)).sum::<u32>() / rgb.len() as u32) as u8
    });
    let grids = prepared.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the image");
    let (_, text) = grids[0].decode().expect("a readable QR code");
    text
}

#[actix_web::test]
async fn the_link_shows_as_a_qr_code_that_a_camera_reads() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let (alice, bob, link) = two_people(&browser, &app).await;
    let qr_hidden = "document.getElementById('qr').hidden";
    assert_eq!(
        alice.eval(qr_hidden).await,
        json!(true),
        "only when asked for"
    );
    let toggle = "document.getElementById('show-qr').click(), true";
    alice.eval(toggle).await;
    alice
        .wait_for("document.querySelector('#qr svg') !== null", 10)
        .await;
    assert_eq!(read_qr(&alice.screenshot_of("#qr svg").await), link);
    // Black on white in a dark page too (cameras read dark on light), and on a phone.
    alice.prefer_color_scheme("dark").await;
    alice.set_viewport(390, 760).await;
    assert_eq!(read_qr(&alice.screenshot_of("#qr svg").await), link);
    assert_eq!(
        alice
            .eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        json!(true)
    );
    alice.eval(toggle).await;
    assert_eq!(alice.eval(qr_hidden).await, json!(true));
    assert_eq!(
        alice.eval("document.querySelector('#qr svg')").await,
        json!(null)
    );
    // Two clicks at once: shown and hidden again, nothing drawn into the hidden figure.
    alice.eval(&format!("{toggle}, {toggle}")).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(alice.eval(qr_hidden).await, json!(true));
    assert_eq!(alice.count("#qr svg, #qr .warning").await, 0);
    // A link too long for a code (a host name of 300 characters) is said to be so.
    alice
        .eval(&format!(
            "document.getElementById('link').value = 'https://{}/#x', {toggle}",
            "h".repeat(300)
        ))
        .await;
    let said = alice
        .wait_for("document.querySelector('#qr .warning')?.textContent", 10)
        .await;
    assert!(said.as_str().unwrap().contains("too long"), "{said}");
    assert_eq!(
        alice.eval("document.querySelector('#qr svg')").await,
        json!(null)
    );
    // The encoder is fetched only by a page that asks for a code.
    assert!(alice.requests().iter().any(|u| u.ends_with("/qr.js")));
    assert!(!bob.requests().iter().any(|u| u.ends_with("/qr.js")));

    // Longer links, up to the most a code here holds: a v3 .onion address (a code with
    // version information) and 213 bytes (the largest version, a 16-bit length).
    let onion = format!("http://{}.onion/#{}", "q".repeat(56), "A".repeat(43));
    let longest = format!("https://{}/#{}", "h".repeat(213 - 53), "B".repeat(43));
    assert_eq!(longest.len(), 213);
    for text in [onion, longest] {
        alice
            .eval(&format!(
                "import('/qr.js').then(m => {{ document.getElementById('probe')?.remove(); \
                 const svg = m.qrSvg({text:?}, 'probe'); svg.id = 'probe'; \
                 svg.setAttribute('width', '360'); document.body.prepend(svg); return true; }})"
            ))
            .await;
        assert_eq!(read_qr(&alice.screenshot_of("#probe").await), text);
    }
    assert_same_origin(&alice, &app);
}

/// A `Notification` that, like Chrome's on Android, will not be made outside a service worker.
const NOTIFICATIONS_ONLY_FROM_A_WORKER: &str = "(() => { const Real = window.Notification; \
    window.Notification = class extends Real { constructor() { \
      throw new TypeError('Illegal constructor. Use ServiceWorkerRegistration.showNotification() instead.'); } }; \
    })()";

/// No service workers, as in Tor Browser (and private windows of some browsers).
const NO_SERVICE_WORKERS: &str = "Object.defineProperty(Navigator.prototype, 'serviceWorker', \
    { get: () => undefined, configurable: true })";

#[actix_web::test]
async fn notifications_come_the_way_each_browser_allows_and_where_none_can_the_choice_goes() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    let home = format!("{}/", origin(&app));
    let android = browser
        .new_page_running(
            &home,
            &format!("{NOTIFICATIONS_ONLY_FROM_A_WORKER}; {RECORD_NOTIFICATIONS}"),
        )
        .await;
    android.grant("notifications", &origin(&app)).await;
    let link = create_room(&android).await;
    let tor = browser
        .new_page_running(
            &link,
            &format!("{NO_SERVICE_WORKERS}; {RECORD_NOTIFICATIONS}"),
        )
        .await;
    let neither = browser
        .new_page_running(
            &link,
            &format!(
                "{NOTIFICATIONS_ONLY_FROM_A_WORKER}; {NO_SERVICE_WORKERS}; {RECORD_NOTIFICATIONS}"
            ),
        )
        .await;
    let bob = browser.new_page(&link).await;
    wait_online(&bob).await;
    let offered = "!document.getElementById('notify').hidden";
    for page in [&android, &tor, &neither] {
        page.grant("notifications", &origin(&app)).await;
        wait_online(page).await;
        assert_eq!(page.eval(offered).await, json!(true));
        turn_notifications_on(page).await;
        page.open_tab_in_front().await;
    }
    say(&bob, "one").await;
    say(&bob, "two").await;

    // Only from a service worker (Chrome on Android): from the page's.
    wait_shown(&android, "2 new messages").await;
    wait_worker_shows(
        &android,
        "all.length === 1 && all[0].body === '2 new messages'",
    )
    .await;
    all_made_by(&android, "worker").await;
    // No service workers (Tor Browser): the page makes them itself, and closes them when seen.
    tor.wait_for("window.shown.some(n => n.body === '2 new messages')", 10)
        .await;
    all_made_by(&tor, "page").await;
    tor.bring_to_front().await;
    tor.wait_for("window.shown.at(-1).closed", 10).await;
    // Neither: the first try failed, the choice is no longer offered, nothing was thrown at
    // the page, and the tab's title still counts.
    neither
        .wait_for("document.title === '(2) NanoChat'", 10)
        .await;
    assert_eq!(neither.eval(offered).await, json!(false));
    assert_eq!(notifications(&neither).await, json!([]));
    neither.bring_to_front().await;
    assert_eq!(neither.eval("document.title").await, json!("NanoChat"));
    for page in [&android, &tor, &neither] {
        assert_same_origin(page, &app);
        let thrown: Vec<_> = page
            .logs()
            .into_iter()
            .filter(|l| l.starts_with("exception"))
            .collect();
        assert!(thrown.is_empty(), "{thrown:?}");
    }
}

#[actix_web::test]
async fn a_click_on_a_notification_brings_the_tab_that_showed_it_to_the_front() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    // One person with two rooms open in two tabs of one browser; Bob in one, Carol in the other.
    let first = page_allowed_to_notify(&browser, &app).await;
    let room_a = create_room(&first).await;
    let carol = browser.new_page(&format!("{}/", origin(&app))).await;
    let room_b = create_room(&carol).await;
    let bob = browser.new_page(&room_a).await;
    wait_online(&bob).await;
    turn_notifications_on(&first).await;
    let second = first.open_beside(&room_b, RECORD_NOTIFICATIONS).await;
    wait_online(&second).await;
    let picked = "navigator.serviceWorker.addEventListener('message', e => { \
        if (e.data === 'picked') window.picked = (window.picked ?? 0) + 1; }), true";
    for tab in [&first, &second] {
        tab.eval(picked).await;
        tab.open_tab_in_front().await;
    }
    say(&bob, "to the first tab").await;
    say(&carol, "to the second tab").await;
    for tab in [&first, &second] {
        wait_shown(tab, "1 new message").await;
    }
    wait_worker_shows(&first, "all.length === 2").await;
    let shown = shown_by_the_worker(&first).await;
    let token = |room: &str| {
        let tag = json!(format!("nanochat-{}", b64u(&keys_of(room).room_id)));
        let n = shown.as_array().unwrap().iter().find(|n| n["tag"] == tag);
        n.unwrap_or_else(|| panic!("{shown}"))["data"]["tab"].clone()
    };
    let (token_a, token_b) = (token(&room_a), token(&room_b));
    assert_ne!(token_a, token_b);

    // What the worker does on a click, up to the focus (which only a real click may do).
    let worker = first.service_worker(&notify_worker(&app)).await;
    for (token, tab, other) in [(&token_a, &first, &second), (&token_b, &second, &first)] {
        let before = other.eval("window.picked ?? 0").await;
        worker
            .eval(&format!(
                "tabOf({token}).then(c => (c.postMessage('picked'), true))"
            ))
            .await;
        tab.wait_for("window.picked === 1", 10).await;
        tab.eval("window.picked = 0, true").await;
        assert_eq!(other.eval("window.picked ?? 0").await, before);
    }
    // A notification whose tab has closed brings a tab of the site, if any is open.
    assert_eq!(
        worker.eval("tabOf('gone').then(c => c !== null)").await,
        json!(true)
    );
}

async fn serve_foreign_page() -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    // Ends with the test's runtime.
    actix_web::rt::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await;
            let page = "<!doctype html><title>elsewhere</title><p>another site";
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    });
    origin
}

/// What a page of `page_origin` meets when its script opens a WebSocket to `app`: the type of
/// the first frame, or "closed" when the connection never opens.
async fn socket_from_page(browser: &Browser, page_origin: &str, app: &TestApp) -> String {
    let page = browser.new_page(&format!("{page_origin}/")).await;
    let url = format!("ws://127.0.0.1:{}/ws", app.port);
    let v = page
        .eval(&format!(
            "new Promise(done => {{ const ws = new WebSocket({url:?}); \
             ws.onmessage = e => {{ done(JSON.parse(e.data).type); ws.close(); }}; \
             ws.onclose = () => done('closed'); }})"
        ))
        .await;
    v.as_str().unwrap().to_owned()
}

#[actix_web::test]
async fn a_page_of_another_site_cannot_open_a_socket_unless_listed() {
    let foreign = serve_foreign_page().await;
    let browser = Browser::launch().await;
    let app = spawn_app(Backend::Sqlite).await;
    assert_eq!(socket_from_page(&browser, &foreign, &app).await, "closed");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("nanochat_upgrades_refused_total{reason=\"origin\"} 1"),
        "{metrics}"
    );
    // The server's own page connects (as in every test above), and so does the other site's
    // once an operator lists it.
    assert_eq!(
        socket_from_page(&browser, &origin(&app), &app).await,
        "hello"
    );
    let listed = foreign.clone();
    let open = spawn_app_with(Backend::Sqlite, move |s| {
        s.server.allowed_origins = vec![listed]
    })
    .await;
    assert_eq!(socket_from_page(&browser, &foreign, &open).await, "hello");
}

/// nginx running `deploy/nginx/nanochat.conf`, with its ports, certificate and upstream made
/// local; stopped when dropped.
struct Nginx {
    child: std::process::Child,
    https: u16,
    http: u16,
    /// The HTTPS server block's port without TLS, for clients that speak no TLS.
    plain: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn run_ok(cmd: &mut std::process::Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {what} ({e}): install it (Debian: `apt-get install -y {what}`)")
    });
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Start the shipped nginx configuration in front of `app`: checked with `nginx -t` first.
async fn start_nginx(app: &TestApp) -> Nginx {
    start_nginx_before(&[app.port]).await
}

/// Start the shipped nginx configuration with these server ports in its upstream block.
async fn start_nginx_before(ports: &[u16]) -> Nginx {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("nginx not found: install it (Debian: `apt-get install -y nginx`)");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    run_ok(
        std::process::Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &path("key.pem"),
            "-out",
            &path("cert.pem"),
        ]),
        "openssl",
    );
    let (https, http, plain) = (free_port(), free_port(), free_port());
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/nanochat.conf"),
    )
    .unwrap();
    let mut site = String::new();
    for line in shipped.lines() {
        let t = line.trim();
        let line = if t.starts_with("listen [::]") {
            continue;
        } else if t == "listen 80;" {
            format!("    listen 127.0.0.1:{http};")
        } else if t.starts_with("listen 443 ") {
            let tls = line.replace("listen 443 ", &format!("listen 127.0.0.1:{https} "));
            format!("{tls}\n    listen 127.0.0.1:{plain};")
        } else if t.starts_with("ssl_certificate ") {
            format!("    ssl_certificate {};", path("cert.pem"))
        } else if t.starts_with("ssl_certificate_key ") {
            format!("    ssl_certificate_key {};", path("key.pem"))
        } else if t == "server 127.0.0.1:8080;" {
            ports
                .iter()
                .map(|p| format!("    server 127.0.0.1:{p};"))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            line.to_owned()
        };
        site.push_str(&line);
        site.push('\n');
    }
    assert!(site.contains(&format!("127.0.0.1:{https} ssl")), "{site}");
    for p in ports {
        assert!(site.contains(&format!("server 127.0.0.1:{p};")), "{site}");
    }
    std::fs::write(path("site.conf"), site).unwrap();
    let temp = |what: &str| format!("{what}_temp_path {};", path(what));
    std::fs::write(
        path("nginx.conf"),
        format!(
            "pid {}; error_log {} warn; daemon off; master_process off;\n\
             events {{}}\n\
             http {{ {} {} {} {} {} include {}; }}\n",
            path("nginx.pid"),
            path("error.log"),
            temp("client_body"),
            temp("proxy"),
            temp("fastcgi"),
            temp("uwsgi"),
            temp("scgi"),
            path("site.conf"),
        ),
    )
    .unwrap();
    let conf = path("nginx.conf");
    run_ok(
        std::process::Command::new(nginx).args(["-t", "-q", "-c", &conf]),
        "nginx",
    );
    let child = std::process::Command::new(nginx)
        .args(["-c", &conf])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start nginx");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", https))
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "nginx did not listen");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Nginx {
        child,
        https,
        http,
        plain,
        _dir: dir,
    }
}

/// With several processes on one Postgres, the shipped upstream block keeps each client address
/// on one of them, so the per-client limits, which each process counts for itself, hold for
/// the whole instance: every socket an address opens through nginx lands on the same process,
/// and different addresses are spread over both.
#[actix_web::test]
async fn the_shipped_nginx_upstream_keeps_each_client_address_on_one_process() {
    let trust = |s: &mut nanochat::config::Settings| s.proxy.trusted = vec!["127.0.0.1".into()];
    let a = spawn_app_with(Backend::Postgres, trust).await;
    let b = crate::helpers::second_node(&a, trust).await;
    let nginx = start_nginx_before(&[a.port, b.port]).await;
    let url = format!("ws://127.0.0.1:{}/ws", nginx.plain);
    let open = || {
        (
            a.state.metrics.connections_open.get(),
            b.state.metrics.connections_open.get(),
        )
    };
    let mut held = Vec::new();
    let mut on_a = 0;
    for n in 2..18 {
        let from: std::net::IpAddr = format!("127.0.0.{n}").parse().unwrap();
        let before = open();
        for _ in 0..6 {
            let client = nanochat::client::Client::connect_from(&url, from)
                .await
                .expect("a socket through nginx");
            held.push(client);
        }
        let after = open();
        let landed = (after.0 - before.0, after.1 - before.1);
        assert!(
            landed == (6, 0) || landed == (0, 6),
            "{from}: {} sockets on one process, {} on the other",
            landed.0,
            landed.1
        );
        on_a += usize::from(landed.0 == 6);
    }
    // 16 addresses all on one of two processes would happen once in 30 000 runs.
    assert!(
        (1..16).contains(&on_a),
        "{on_a} of 16 addresses on the first process"
    );
}

/// The whole path an operator sets up: TLS and the WebSocket upgrade in nginx with the shipped
/// configuration, the server trusting it; two people chat through it and the server sees each
/// socket's page as its own (nginx passes `Host` on).
#[actix_web::test]
async fn two_people_chat_through_the_shipped_nginx_configuration() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.proxy.trusted = vec!["127.0.0.1".into()];
    })
    .await;
    let nginx = start_nginx(&app).await;
    let plain = crate::helpers::http_get(nginx.http, "/").await;
    assert_eq!(plain.status, 301);
    assert!(
        plain
            .headers
            .get("location")
            .is_some_and(|l| l.starts_with("https://")),
        "{:?}",
        plain.headers
    );
    let browser = Browser::launch_with(&["--ignore-certificate-errors"]).await;
    let alice = browser
        .new_page(&format!("https://127.0.0.1:{}/", nginx.https))
        .await;
    set_nick(&alice, "alice").await;
    let link = create_room(&alice).await;
    assert!(
        link.starts_with(&format!("https://127.0.0.1:{}/#", nginx.https)),
        "{link}"
    );
    let bob = browser.new_page(&link).await;
    set_nick(&bob, "bob").await;
    wait_online(&bob).await;
    say(&alice, "through the proxy").await;
    wait_for_text(&bob, "through the proxy").await;
    let metrics = app.metrics().await;
    assert!(metrics.contains("nanochat_connections_open 2"), "{metrics}");
    assert!(
        metrics.contains("nanochat_upgrades_refused_total{reason=\"origin\"} 0"),
        "{metrics}"
    );
    // A page that asks for its files 200 times at once: nginx answers 429 itself past its burst
    // of 120 and past 64 requests in progress (the server, with no limit of its own in this
    // test, never sees those).
    let statuses = alice
        .eval(
            "Promise.all([...Array(200)].map(() => fetch('/style.css', { cache: 'no-store' }) \
             .then(r => r.status)))",
        )
        .await;
    let statuses: Vec<u16> = serde_json::from_value(statuses).unwrap();
    // At most the burst (less what the two page loads took, plus what refills meanwhile) gets
    // through `limit_req`: 60 or more refused (27 without it, all from `limit_conn`). At least
    // the 64 in progress at once get through both (the burst covers them): at most 136 refused.
    // Where in between depends on how many are in progress at once (117 seen in CI).
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert!(
        (60..=136).contains(&refused) && statuses.iter().all(|&s| s == 200 || s == 429),
        "{refused} of 200 refused: {statuses:?}"
    );
    assert_eq!(app.refused("client_requests"), 0);
}

/// An instance with no proxy in front: the server's own HTTPS (`[tls]`). A visitor who types
/// the http:// address lands on https:// through the redirect listener, and two people chat.
#[actix_web::test]
async fn two_people_chat_over_the_servers_own_https() {
    let ca = crate::tls::TestCa::new();
    let app = crate::tls::spawn_tls_app(Backend::Sqlite, &ca.issue((2030, 6, 15)), |s| {
        s.tls.redirect_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let browser = Browser::launch_with(&["--ignore-certificate-errors"]).await;
    let typed = format!("http://127.0.0.1:{}/", app.redirect_port.unwrap());
    let alice = browser.new_page(&typed).await;
    set_nick(&alice, "alice").await;
    let link = create_room(&alice).await;
    let https = format!("https://127.0.0.1:{}/#", app.port);
    assert!(link.starts_with(&https), "{link}");
    let bob = browser.new_page(&link).await;
    set_nick(&bob, "bob").await;
    wait_online(&bob).await;
    say(&alice, "no proxy needed").await;
    wait_for_text(&bob, "no proxy needed").await;
    let metrics = app.metrics().await;
    assert!(metrics.contains("nanochat_connections_open 2"), "{metrics}");
}

/// The accessibility problems axe-core (run inside the page) finds there: `id (impact): nodes`.
async fn accessibility_violations(page: &Page<'_>) -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/a11y/node_modules/axe-core/axe.min.js"
    );
    let axe = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{path}: {e}. The accessibility checks need axe-core from npm: \
             `npm ci --prefix tests/a11y` (tests/run.sh runs it)"
        )
    });
    page.eval(&format!("{axe}\n;true")).await;
    let found = page
        .eval(
            "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations.map(v => \
             `${v.id} (${v.impact}): ${v.nodes.map(n => n.target.join(' ')).join(', ')}`))",
        )
        .await;
    serde_json::from_value(found).unwrap()
}

#[actix_web::test]
async fn every_screen_passes_an_accessibility_check_in_light_and_dark() {
    let app = spawn_app(Backend::Sqlite).await;
    let browser = Browser::launch().await;
    for scheme in ["light", "dark"] {
        let check = async |page: &Page<'_>, screen: &str| {
            page.prefer_color_scheme(scheme).await;
            let found = accessibility_violations(page).await;
            assert!(found.is_empty(), "{screen}, {scheme}: {found:#?}");
        };
        let landing = browser.new_page(&format!("{}/", origin(&app))).await;
        check(&landing, "landing").await;

        // A conversation with everything a room shows: own and others' messages, a link, the
        // "New messages" button of a reader scrolled up, a notice.
        let (alice, bob, _) = two_people(&browser, &app).await;
        bob.set_viewport(390, 600).await;
        for i in 1..=12 {
            say(&alice, &format!("line {i}, see https://example.org/{i}")).await;
        }
        say(&bob, "hi").await;
        wait_for_text(&bob, "line 12, see https://example.org/12").await;
        bob.eval("document.getElementById('scroller').scrollTop = 0, true")
            .await;
        say(&alice, "one more").await;
        wait_for_text(&bob, "one more").await;
        bob.wait_for("!document.getElementById('jump').hidden", 10)
            .await;
        say(&bob, &"x".repeat(9_000)).await;
        bob.wait_for("!document.getElementById('notice').hidden", 10)
            .await;
        check(&bob, "room").await;
        bob.set_viewport(390, 420).await; // a phone with its keyboard open
        check(&bob, "room on a short screen").await;
        alice
            .eval("document.getElementById('show-qr').click(), true")
            .await;
        alice
            .wait_for("document.querySelector('#qr svg') !== null", 10)
            .await;
        check(&alice, "room with its QR code").await;

        alice
            .eval("document.getElementById('panic').click(), true")
            .await;
        alice
            .wait_for("document.getElementById('panic-dialog').open", 5)
            .await;
        check(&alice, "panic dialog").await;
        alice
            .eval("document.getElementById('panic-confirm').click(), true")
            .await;
        bob.wait_for("!document.getElementById('gone').hidden", 20)
            .await;
        check(&bob, "wiped room").await;
    }
}
