//! The controller's HTTPS pages through curl, with a cookie jar of its own, for tests that
//! read a page as a signed-in user: an admin signs in and sets up TOTP (`oathtool` makes
//! the code), as a first sign-in in a browser would. curl can run anywhere (inside a
//! network namespace, say): the caller passes how to run it.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

/// Runs curl with these arguments and returns its standard output.
pub type CurlRunner<'a> = Box<dyn Fn(&[String]) -> Result<String> + 'a>;

/// A signed-in (or signing-in) web session.
pub struct CurlSession<'a> {
    base: String,
    cacert: PathBuf,
    jar: PathBuf,
    runner: CurlRunner<'a>,
}

/// The value of the first `name="csrf" value="..."` field of a page.
pub fn csrf_of(page: &str) -> Result<String> {
    let i = page
        .find("name=\"csrf\" value=\"")
        .context("no csrf field on the page")?
        + 19;
    Ok(page[i..].split('"').next().unwrap_or_default().to_string())
}

/// The text of the element with `id` (its first text run).
pub fn text_of_id(page: &str, id: &str) -> Option<String> {
    let i = page.find(&format!("id=\"{id}\""))?;
    let start = i + page[i..].find('>')? + 1;
    let end = start + page[start..].find('<')?;
    Some(page[start..end].to_string())
}

impl<'a> CurlSession<'a> {
    /// A session against `base` (`https://host:port`) trusting `cacert`, keeping cookies in
    /// `jar`.
    pub fn new(base: &str, cacert: PathBuf, jar: PathBuf, runner: CurlRunner<'a>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            cacert,
            jar,
            runner,
        }
    }

    fn curl(&self, extra: &[String]) -> Result<String> {
        let mut args: Vec<String> = ["-sS", "--max-time", "20", "--cacert"]
            .map(String::from)
            .into();
        args.push(self.cacert.display().to_string());
        for flag in ["-c", "-b"] {
            args.push(flag.into());
            args.push(self.jar.display().to_string());
        }
        args.extend_from_slice(extra);
        (self.runner)(&args)
    }

    /// `GET path`: the body.
    pub fn get(&self, path: &str) -> Result<String> {
        self.curl(&[format!("{}{path}", self.base)])
    }

    /// `POST path` with form `fields` from this origin; returns `(status, Location)`.
    pub fn post(&self, path: &str, fields: &[(&str, &str)]) -> Result<(u16, String)> {
        let mut args = vec![
            "-o".to_string(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code} %{redirect_url}".into(),
            "-H".into(),
            format!("Origin: {}", self.base),
        ];
        for (k, v) in fields {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        args.push(format!("{}{path}", self.base));
        let out = self.curl(&args)?;
        let (code, loc) = out.trim().split_once(' ').unwrap_or((out.trim(), ""));
        Ok((code.parse().context("HTTP status")?, loc.to_string()))
    }

    /// `GET path`: the status and the body.
    pub fn get_page(&self, path: &str) -> Result<(u16, String)> {
        self.page(&[format!("{}{path}", self.base)])
    }

    /// `POST path` with form `fields` from this origin, redirects not followed: the status
    /// and the body (an error page, say).
    pub fn post_page(&self, path: &str, fields: &[(&str, &str)]) -> Result<(u16, String)> {
        let mut args = vec!["-H".to_string(), format!("Origin: {}", self.base)];
        for (k, v) in fields {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        args.push(format!("{}{path}", self.base));
        self.page(&args)
    }

    fn page(&self, extra: &[String]) -> Result<(u16, String)> {
        let mut args = vec!["-w".to_string(), "\n%{http_code}".into()];
        args.extend_from_slice(extra);
        let out = self.curl(&args)?;
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        Ok((
            code.trim().parse().context("HTTP status")?,
            body.to_string(),
        ))
    }

    /// Sign in with a password; an admin without a second factor then sets up TOTP.
    pub fn sign_in(&self, email: &str, password: &str) -> Result<()> {
        let csrf = csrf_of(&self.get("/signin")?)?;
        let (code, loc) = self.post(
            "/signin",
            &[("csrf", &csrf), ("email", email), ("password", password)],
        )?;
        if !(300..400).contains(&code) {
            bail!("sign-in of {email} answered {code}");
        }
        if loc.ends_with("/enroll") {
            let page = self.get("/enroll")?;
            let secret = text_of_id(&page, "secret").context("no TOTP secret on /enroll")?;
            let otp = crate::run_ok(std::process::Command::new("oathtool").args([
                "--totp",
                "-b",
                secret.trim(),
            ]))?;
            let (code, _) = self.post(
                "/enroll",
                &[("csrf", &csrf_of(&page)?), ("code", otp.trim())],
            )?;
            if code != 200 {
                bail!("TOTP set-up of {email} answered {code}");
            }
        }
        Ok(())
    }
}
