use super::*;
use std::io::Write;

fn sshd_line(ip: &str) -> String {
    format!("Dec  1 20:00:01 a1 sshd[4242]: Failed password for root from {ip} port 50522 ssh2\n")
}

fn append(path: &Path, text: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text).unwrap();
}

/// Collect the sources of queued events until `want` arrived or 5 s passed.
async fn sources(rx: &mut mpsc::Receiver<pb::SecurityEvent>, want: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while out.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => {
                assert_eq!(e.kind, patterns::SSH_KIND);
                out.push(e.source);
            }
            _ => break,
        }
    }
    out
}

#[test]
fn watch_log_flags_parse_and_refuse_with_a_reason() {
    let s = LogSource::parse("sshd:/var/log/auth.log").unwrap();
    assert_eq!(s.origin, Origin::File("/var/log/auth.log".into()));
    assert_eq!(
        LogSource::parse("sshd:journal").unwrap().origin,
        Origin::Journal
    );
    LogSource::parse("kamailio:/var/log/kamailio.log").unwrap();
    LogSource::parse("asterisk:/var/log/asterisk/messages").unwrap();
    let r = LogSource::parse(r"regex:/var/log/app.log:denied (?P<source>\S+)$").unwrap();
    assert_eq!(r.describe(), "regex:/var/log/app.log");
    for bad in [
        "sshd",
        "sshd:",
        "nginx:/var/log/x",
        "regex:/var/log/x",
        "regex::(x)",
        "regex:/x:no group",
    ] {
        let e = LogSource::parse(bad).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn sources_toml_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sources.toml");
    assert!(load_sources_file(&p).unwrap().is_empty());
    std::fs::write(
        &p,
        r#"
[[source]]
kind = "sshd"
journal = true

[[source]]
kind = "asterisk"
path = "/var/log/asterisk/messages"

[[source]]
kind = "regex"
path = "/var/log/app.log"
pattern = 'login failed from (?P<source>\S+)$'
"#,
    )
    .unwrap();
    let all = configured(&[LogSource::parse("kamailio:/k.log").unwrap()], &p).unwrap();
    let names: Vec<String> = all.iter().map(LogSource::describe).collect();
    assert_eq!(
        names,
        [
            "kamailio:/k.log",
            "sshd:journal",
            "asterisk:/var/log/asterisk/messages",
            "regex:/var/log/app.log"
        ]
    );
    for (text, why) in [
        ("[[source]]\nkind = \"sshd\"\n", "exactly one"),
        (
            "[[source]]\nkind = \"asterisk\"\njournal = true\n",
            "journal",
        ),
        ("[[source]]\nkind = \"regex\"\npath = \"/x\"\n", "pattern"),
        (
            "[[source]]\nkind = \"ftp\"\npath = \"/x\"\n",
            "unknown kind",
        ),
        (
            "[[source]]\nkind = \"sshd\"\npath = \"/x\"\npattern = \"(x)\"\n",
            "only regex",
        ),
        (
            "[[source]]\nkind = \"regex\"\npath = \"/x\"\npattern = \"x\"\n",
            "capture group",
        ),
        (
            "[[source]]\nkind = \"sshd\"\npath = \"/x\"\ncolour = 1\n",
            "colour",
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let e = load_sources_file(&p).unwrap_err().to_string();
        assert!(e.contains(why), "{text}: {e}");
    }
}

#[test]
fn journal_records_give_sshd_messages_only() {
    assert_eq!(
        journal_message(
            r#"{"SYSLOG_IDENTIFIER":"sshd","MESSAGE":"Failed password for root from 198.18.7.7 port 1 ssh2"}"#
        )
        .as_deref(),
        Some("Failed password for root from 198.18.7.7 port 1 ssh2")
    );
    assert_eq!(
        journal_message(
            r#"{"SYSLOG_IDENTIFIER":"cron","MESSAGE":"Failed password for root from 198.18.7.7 port 1 ssh2"}"#
        ),
        None
    );
    // Non-UTF-8 messages come as byte arrays.
    let m =
        journal_message(r#"{"SYSLOG_IDENTIFIER":"sshd-session","MESSAGE":[73,255,110]}"#).unwrap();
    assert_eq!(m, "I\u{fffd}n");
    let long = format!(
        r#"{{"SYSLOG_IDENTIFIER":"sshd","MESSAGE":"{}"}}"#,
        "x".repeat(MAX_LINE + 1)
    );
    assert_eq!(journal_message(&long), None);
    assert_eq!(journal_message("not json"), None);
}

fn start(
    path: &Path,
) -> (
    mpsc::Receiver<pb::SecurityEvent>,
    Arc<LogwatchStats>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let stats = Arc::new(LogwatchStats::default());
    let q = EventQueue::new(tx, stats.clone());
    let stop = CancellationToken::new();
    let (p, s) = (path.to_path_buf(), stop.clone());
    let h = tokio::task::spawn_blocking(move || {
        follow_file(&p, &Parser::SshdFile, "sshd:test", &q, &s);
    });
    (rx, stats, stop, h)
}

async fn settle() {
    tokio::time::sleep(POLL * 3).await;
}

#[tokio::test]
async fn the_follower_starts_at_the_end_and_follows_rotation_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("auth.log");
    append(&log, sshd_line("198.18.1.1").as_bytes());
    let (mut rx, _stats, stop, h) = start(&log);
    // A failed assertion must still stop the follower, or the runtime waits for it forever.
    let _stop_on_panic = stop.clone().drop_guard();
    settle().await;
    append(&log, sshd_line("198.18.1.2").as_bytes());
    assert_eq!(sources(&mut rx, 1).await, ["198.18.1.2"]);

    // Rotation by rename: the rest of the old file, then the new file from its start.
    let old = dir.path().join("auth.log.1");
    std::fs::rename(&log, &old).unwrap();
    append(&old, sshd_line("198.18.1.3").as_bytes());
    append(&log, sshd_line("198.18.1.4").as_bytes());
    assert_eq!(sources(&mut rx, 2).await, ["198.18.1.3", "198.18.1.4"]);

    // Truncation (copytruncate): from the start again.
    append(&log, sshd_line("198.18.1.5").as_bytes());
    assert_eq!(sources(&mut rx, 1).await, ["198.18.1.5"]);
    std::fs::write(&log, b"").unwrap();
    settle().await;
    append(&log, sshd_line("198.18.1.6").as_bytes());
    assert_eq!(sources(&mut rx, 1).await, ["198.18.1.6"]);

    // A file that appears later is read from its start.
    std::fs::remove_file(&log).unwrap();
    settle().await;
    append(&log, sshd_line("198.18.1.7").as_bytes());
    assert_eq!(sources(&mut rx, 1).await, ["198.18.1.7"]);
    stop.cancel();
    h.await.unwrap();
}

#[tokio::test]
async fn hostile_lines_yield_no_false_source_and_a_flood_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("auth.log");
    append(&log, b"");
    let (mut rx, stats, stop, h) = start(&log);
    // A failed assertion must still stop the follower, or the runtime waits for it forever.
    let _stop_on_panic = stop.clone().drop_guard();
    settle().await;
    // The follower is at the end of the file once a first line reaches it (on a loaded
    // machine it may open the file later than the settling pause).
    let mut started = false;
    for _ in 0..20 {
        append(&log, sshd_line("198.18.2.9").as_bytes());
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            started = true;
            break;
        }
    }
    assert!(started, "the follower never read an appended line");
    // Sentinels appended before it opened the file are never read; any read late go now.
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        assert_eq!(e.source, "198.18.2.9");
    }
    let base = stats.matched.load(Ordering::Relaxed);
    // Very long (the real address at its end must not count: the line is dropped whole),
    // binary, and a spoofed address in the user name.
    let long = format!(
        "Dec  1 20:00:01 a1 sshd[1]: Failed password for {} from 198.18.2.1 port 1 ssh2\n",
        "A".repeat(100_000)
    );
    append(&log, long.as_bytes());
    append(
        &log,
        b"\x00\xff\xfe sshd[1]: Failed password for \xff from 198.18.2.2 port 1 ssh2\n",
    );
    append(&log, &[0xffu8; 50_000]);
    append(&log, b"\n");
    append(
        &log,
        b"Dec  1 20:00:01 a1 sshd[1]: Failed password for invalid user x from 1.2.3.4 port 22 ssh2 from 198.18.2.3 port 5 ssh2\n",
    );
    assert_eq!(sources(&mut rx, 2).await, ["198.18.2.2", "198.18.2.3"]);
    // The 100 KB line and the 50 KB of junk were dropped as overlong: counted when the
    // follower next pauses at the end of the file.
    let overlong = || stats.overlong.load(Ordering::Relaxed);
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while overlong() < 2 && tokio::time::Instant::now() < until {
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(overlong(), 2, "overlong lines counted");

    // A flood: far more matches than the queue holds. The follower never waits on the
    // queue, drops and counts the rest, and keeps up.
    let mut flood = Vec::new();
    for i in 0..20_000u32 {
        flood.extend_from_slice(
            sshd_line(&format!("198.18.{}.{}", 3 + i / 250, i % 250)).as_bytes(),
        );
    }
    append(&log, &flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while stats.matched.load(Ordering::Relaxed) < base + 20_002
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(stats.matched.load(Ordering::Relaxed), base + 20_002);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 20_000 - 64);
    assert_eq!(rx.len(), 64);
    stop.cancel();
    h.await.unwrap();
}

#[tokio::test]
async fn an_asterisk_log_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sip.log");
    append(&log, b"");
    let (tx, mut rx) = mpsc::channel(64);
    let q = EventQueue::new(tx, Arc::new(LogwatchStats::default()));
    let stop = CancellationToken::new();
    let src = LogSource::parse(&format!("asterisk:{}", log.display())).unwrap();
    let task = tokio::spawn(run(vec![src], q, stop.clone()));
    settle().await;
    append(
        &log,
        b"[Dec  1 20:00:01] NOTICE[1234] chan_sip.c: Registration from '\"100\" <sip:100@198.18.100.21>' failed for '198.18.100.99:5060' - Wrong password\n",
    );
    let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.kind.as_str(), e.source.as_str()),
        (patterns::SIP_KIND, "198.18.100.99")
    );
    stop.cancel();
    task.await.unwrap();
}
