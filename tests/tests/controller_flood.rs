//! Connection floods against the real controller started with a 1,024-file limit: silent
//! TCP connections and TLS sessions that never send a request, on the PKI, HTTPS and gRPC
//! ports. The controller must keep answering `/crl`, the sign-in page and the admin socket,
//! close the silent connections itself, and keep its log small.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};
use zonemesh_agent::control::client;
use zonemesh_tests::cluster::Controller;

/// More than the controller's whole file limit, on one port.
const PKI_FLOOD: usize = 1_100;
const HTTPS_FLOOD: usize = 300;
const GRPC_FLOOD: usize = 300;
/// The controller closes a connection that sent no request within 10 s of accept.
const CLOSED_WITHIN: Duration = Duration::from_secs(16);

/// Let this test process hold a few thousand sockets, whatever its soft limit was.
fn raise_own_fd_limit() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .unwrap_or_default();
    let want = if hard == "unlimited" {
        "65536".into()
    } else {
        hard
    };
    let _ = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={want}:"))
        .status();
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(source, 0))?;
    tokio::time::timeout(Duration::from_secs(1), s.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Open `n` connections from `source` that never send anything (giving up after 10 s:
/// a server that stopped accepting leaves connects hanging).
async fn silent_tcp(n: usize, source: IpAddr, to: SocketAddr) -> Vec<TcpStream> {
    let until = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if Instant::now() > until {
            break;
        }
        if let Ok(s) = connect_from(source, to).await {
            out.push(s);
        }
    }
    out
}

/// Open `n` TLS sessions from `source` that complete the handshake and then say nothing.
/// Returns the sessions whose handshake finished (the others were refused at once).
async fn silent_tls(
    n: usize,
    source: IpAddr,
    to: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls_pki_types::ServerName::IpAddress(to.ip().into());
    let mut handshakes = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (c, name) = (connector.clone(), name.clone());
        handshakes.spawn(async move {
            let tcp = connect_from(source, to).await.ok()?;
            tokio::time::timeout(Duration::from_secs(5), c.connect(name, tcp))
                .await
                .ok()?
                .ok()
        });
    }
    let mut out = Vec::new();
    while let Some(r) = handshakes.join_next().await {
        if let Ok(Some(s)) = r {
            out.push(s);
        }
    }
    out
}

/// How many of `conns` are still open `CLOSED_WITHIN` after `opened`.
async fn still_open<S: AsyncRead + Unpin + Send + 'static>(
    conns: Vec<S>,
    opened: Instant,
) -> usize {
    let deadline = tokio::time::Instant::from_std(opened + CLOSED_WITHIN);
    let mut reads = tokio::task::JoinSet::new();
    for mut c in conns {
        reads.spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                    Err(_) => return true,
                    Ok(Ok(0)) | Ok(Err(_)) => return false,
                    // The server may say why before closing; keep reading until EOF.
                    Ok(Ok(_)) => continue,
                }
            }
        });
    }
    let mut open = 0;
    while let Some(r) = reads.join_next().await {
        open += usize::from(r.unwrap_or(true));
    }
    open
}

fn curl(url: &str) -> (String, usize) {
    let out = std::process::Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.rsplit('\n').next().unwrap_or("").to_string();
    (code, out.stdout.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_flood_under_1024_files_leaves_crl_signin_and_admin_answering() {
    raise_own_fd_limit();
    let dir = TempDir::new().unwrap();
    let mut ctl = Controller::init(dir.path()).unwrap();
    ctl.fd_limit = Some(1024);
    ctl.start().unwrap();
    let started = Instant::now();
    let tls = Arc::new(client::pinned_config(&ctl.fingerprint).unwrap());

    // Each flood from its own loopback address; the checks below come from 127.0.0.1.
    let pki_src: IpAddr = "127.0.0.2".parse().unwrap();
    let https_src: IpAddr = "127.0.0.3".parse().unwrap();
    let grpc_src: IpAddr = "127.0.0.4".parse().unwrap();
    let https_tls_src: IpAddr = "127.0.0.5".parse().unwrap();
    let grpc_tls_src: IpAddr = "127.0.0.6".parse().unwrap();
    let opened = Instant::now();
    let pki = silent_tcp(PKI_FLOOD, pki_src, ctl.pki).await;
    let https_tcp = silent_tcp(HTTPS_FLOOD / 2, https_src, ctl.https).await;
    let https_tls = silent_tls(HTTPS_FLOOD / 2, https_tls_src, ctl.https, tls.clone()).await;
    let grpc_tcp = silent_tcp(GRPC_FLOOD / 2, grpc_src, ctl.grpc).await;
    let grpc_tls = silent_tls(GRPC_FLOOD / 2, grpc_tls_src, ctl.grpc, tls.clone()).await;
    let flooded_in = opened.elapsed();
    eprintln!(
        "open after flood ({flooded_in:?}): pki {} tcp, https {} tcp + {} tls, grpc {} tcp + {} tls",
        pki.len(),
        https_tcp.len(),
        https_tls.len(),
        grpc_tcp.len(),
        grpc_tls.len()
    );
    assert!(
        pki.len() >= PKI_FLOOD / 2,
        "the flood itself failed to connect: {}",
        pki.len()
    );

    // While the flood is open, from another address: CRL, sign-in page, admin socket, and a
    // gRPC handshake. Every failure is reported together, with the size of the log.
    let probe = Instant::now();
    let mut failed = Vec::new();
    let pki_url = format!("http://{}/crl", ctl.pki);
    let signin_url = format!("https://{}/signin", ctl.https);
    let (crl_code, crl_len) = tokio::task::spawn_blocking(move || curl(&pki_url))
        .await
        .unwrap();
    if crl_code != "200" || crl_len < 100 {
        failed.push(format!("GET /crl: status {crl_code:?}, {crl_len} bytes"));
    }
    let (signin_code, _) = tokio::task::spawn_blocking(move || curl(&signin_url))
        .await
        .unwrap();
    if signin_code != "200" {
        failed.push(format!("GET /signin: status {signin_code:?}"));
    }
    let nodes = std::process::Command::new("timeout")
        .arg("10")
        .arg(&ctl.binary)
        .args(["node", "list", "--json", "--data-dir"])
        .arg(&ctl.data_dir)
        .output()
        .unwrap();
    if !nodes.status.success() {
        failed.push(format!(
            "admin `node list`: {} {}",
            nodes.status,
            String::from_utf8_lossy(&nodes.stderr).trim()
        ));
    }
    let fresh = silent_tls(1, "127.0.0.1".parse().unwrap(), ctl.grpc, tls.clone()).await;
    if fresh.len() != 1 {
        failed.push("gRPC TLS handshake from another source".into());
    }
    if https_tls.is_empty() || grpc_tls.is_empty() {
        failed.push("no TLS session of the flood got through at all".into());
    }
    assert!(
        failed.is_empty(),
        "during the flood (probes took {:?}, log {} bytes): {failed:#?}",
        probe.elapsed(),
        ctl.log_text().len()
    );
    eprintln!("probes answered in {:?}", probe.elapsed());

    // A client that connects to the admin socket and says nothing is cut off.
    let admin = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::UnixStream::connect(ctl.data_dir.join("admin.sock")),
    )
    .await
    .expect("admin socket connect timed out")
    .unwrap();
    let admin_opened = Instant::now();

    // The server closes every silent connection itself, within its deadline.
    let open = still_open(pki, opened).await
        + still_open(https_tcp, opened).await
        + still_open(https_tls, opened).await
        + still_open(grpc_tcp, opened).await
        + still_open(grpc_tls, opened).await
        + still_open(fresh, probe).await;
    assert_eq!(
        open, 0,
        "silent connections still open after {CLOSED_WITHIN:?}"
    );
    assert_eq!(
        still_open(vec![admin], admin_opened).await,
        0,
        "silent admin connection still open"
    );

    assert!(ctl.is_running(), "controller died:\n{}", ctl.log_text());
    let log = ctl.log_text();
    assert!(
        log.len() < 1_000_000,
        "log grew to {} bytes; last lines:\n{}",
        log.len(),
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "log {} bytes, {} lines; test took {:?}",
        log.len(),
        log.lines().count(),
        started.elapsed()
    );
}
