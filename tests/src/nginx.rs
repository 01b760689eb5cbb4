//! Debian's nginx with a configuration of our own in a temporary prefix: one TLS server
//! per site (certificate, key, optionally a stapled OCSP response from a file), in the
//! foreground, optionally inside a network namespace. Killed on drop.

use crate::janitor::Janitor;
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when nginx is installed.
pub fn installed() -> bool {
    crate::have("nginx") || Path::new("/usr/sbin/nginx").exists()
}

fn nginx_bin() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

/// One TLS server block.
pub struct Site {
    pub listen: SocketAddr,
    pub server_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ssl_stapling_file`: a DER OCSP response served as the staple.
    pub staple: Option<PathBuf>,
    /// Response body for `/`.
    pub body: String,
}

/// A running nginx.
pub struct Nginx {
    pub prefix: PathBuf,
    pub conf: PathBuf,
    child: Option<Child>,
}

impl Nginx {
    /// Write the configuration under `prefix` and start nginx (in `netns` when given);
    /// returns once every site accepts connections.
    pub fn start(
        prefix: &Path,
        sites: &[Site],
        workers: usize,
        netns: Option<&str>,
        janitor: Option<&Janitor>,
    ) -> Result<Self> {
        std::fs::create_dir_all(prefix.join("logs"))?;
        let conf = prefix.join("nginx.conf");
        let p = prefix.display();
        let mut c = format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes {workers};\n\
             pid {p}/nginx.pid;\nerror_log {p}/logs/error.log notice;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  \
             proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  \
             uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n"
        );
        for s in sites {
            write!(
                c,
                "  server {{\n    listen {} ssl;\n    server_name {};\n    \
                 ssl_certificate {};\n    ssl_certificate_key {};\n    \
                 ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache off;\n    \
                 ssl_session_tickets off;\n",
                s.listen,
                s.server_name,
                s.cert.display(),
                s.key.display()
            )?;
            if let Some(st) = &s.staple {
                write!(
                    c,
                    "    ssl_stapling on;\n    ssl_stapling_file {};\n",
                    st.display()
                )?;
            }
            write!(
                c,
                "    location / {{ return 200 \"{}\"; }}\n  }}\n",
                s.body.replace('"', "")
            )?;
        }
        c.push_str("}\n");
        std::fs::write(&conf, c)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, nginx_bin()]);
                c
            }
            None => Command::new(nginx_bin()),
        };
        let child = cmd
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(prefix.join("logs/stderr.log"))?)
            .spawn()
            .context("spawning nginx")?;
        if let Some(j) = janitor {
            j.track_pid(child.id())?;
        }
        let mut me = Self {
            prefix: prefix.to_path_buf(),
            conf,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                me.child = None;
                bail!("nginx exited ({st}):\n{}", me.log());
            }
            let up = sites.iter().all(|s| match netns {
                Some(ns) => Command::new("ip")
                    .args(["netns", "exec", ns, "bash", "-c"])
                    .arg(format!(
                        "exec 3<>/dev/tcp/{}/{}",
                        s.listen.ip(),
                        s.listen.port()
                    ))
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|st| st.success()),
                None => std::net::TcpStream::connect(s.listen).is_ok(),
            });
            if up {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!("nginx did not come up:\n{}", me.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The reload command for this instance (`nginx -s reload` with its configuration).
    pub fn reload_command(&self) -> String {
        format!(
            "{} -c {} -p {} -s reload",
            nginx_bin(),
            self.conf.display(),
            self.prefix.display()
        )
    }

    /// The master process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// nginx's error log and stderr.
    pub fn log(&self) -> String {
        let r = |n: &str| std::fs::read_to_string(self.prefix.join(n)).unwrap_or_default();
        format!("{}{}", r("logs/error.log"), r("logs/stderr.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM lets the master stop its workers; KILL would leave them behind.
        if let Some(mut c) = self.child.take() {
            crate::cluster::signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
