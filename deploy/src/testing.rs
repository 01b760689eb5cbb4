//! Test fixtures shared by the deploy crate's tests and the controller's (feature
//! `testing`): a local ACME CA.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running pebble (Debian `pebble`, with `pebble-challtestsrv` as its DNS: every name
/// is 127.0.0.1) and its mock DNS, stopped on drop.
pub struct Pebble {
    children: Vec<Child>,
    /// The ACME directory URL.
    pub directory: String,
    /// The root of pebble's HTTPS listener.
    pub tls_root: rustls_pki_types::CertificateDer<'static>,
    _dir: tempfile::TempDir,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Start pebble validating HTTP-01 on `http01_port` of 127.0.0.1.
    pub fn start(http01_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        // pebble's own HTTPS listener: a throwaway CA and a localhost certificate.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let srv_key = rcgen::KeyPair::generate().unwrap();
        let mut srv_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        srv_params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let srv_cert = srv_params.signed_by(&srv_key, &issuer).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, srv_cert.pem()).unwrap();
        std::fs::write(&key_path, srv_key.serialize_pem()).unwrap();

        let (acme, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_udp_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": cert_path, "privateKey": key_path,
            "httpPort": http01_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let dns_srv = Command::new("pebble-challtestsrv")
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .unwrap();
        let p = Pebble {
            children: vec![dns_srv, pebble],
            directory: format!("https://127.0.0.1:{acme}/dir"),
            tls_root: ca_cert.der().clone(),
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", acme)).is_err() {
            assert!(Instant::now() < until, "pebble did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }
}
