//! `[server] outbound_proxy` and `no_proxy`: the corporate HTTP proxy that token and
//! upstream requests go through, resolved once (for `"env"`, from the environment).
//!
//! Both the token client and the upstream client are built from the same
//! [`OutboundProxy`], so they agree on which hosts go through the proxy. Which host
//! matches which rule is decided by hyper-util's `NO_PROXY` matcher (curl's rules).

use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use url::Url;

use crate::secret::Secret;

/// Where requests leave through, when `outbound_proxy` is set.
#[derive(Clone, PartialEq, Eq)]
pub struct OutboundProxy {
    /// For `http://` destinations.
    pub http: Option<ProxyUrl>,
    /// For `https://` destinations (through `CONNECT`).
    pub https: Option<ProxyUrl>,
    /// Hosts reached directly: names (with their subdomains), `.suffix` domains, IPs,
    /// CIDRs, `*`.
    pub no_proxy: Vec<String>,
    /// True for `outbound_proxy = "env"`.
    pub from_env: bool,
}

/// A proxy URL, normalized to `http://[user:pass@]host:port`. The whole URL is a
/// secret (it may hold the proxy password); [`ProxyUrl::shown`] is the printable form.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    url: Secret,
    shown: String,
}

/// Port used when the proxy URL names none (curl's default).
const DEFAULT_PROXY_PORT: u16 = 1080;

impl ProxyUrl {
    /// Parses a proxy URL; `http://` may be left out (as in `HTTPS_PROXY=proxy:3128`)
    /// when `scheme_optional`. Errors never quote the value: it may hold a password.
    pub fn parse(value: &str, scheme_optional: bool) -> Result<Self, String> {
        let value = value.trim();
        let with_scheme = if !value.contains("://") {
            if !scheme_optional {
                return Err(
                    "must start with http:// (like http://user:pass@proxy.corp:3128)".to_owned(),
                );
            }
            format!("http://{value}")
        } else {
            value.to_owned()
        };
        let url = Url::parse(&with_scheme)
            .map_err(|_| "is not a URL like http://user:pass@proxy.corp:3128".to_owned())?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(
                    "is an https:// proxy (TLS to the proxy itself), which is not supported; \
                     use http:// (requests to https:// hosts still go end-to-end encrypted \
                     through CONNECT)"
                        .to_owned(),
                )
            }
            other => {
                return Err(format!(
                    "has scheme `{other}`: only http:// proxies are supported"
                ))
            }
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            _ => return Err("has no host".to_owned()),
        };
        if url.query().is_some() || url.fragment().is_some() || url.path() != "/" {
            return Err("must be only http://[user:pass@]host:port, without a path".to_owned());
        }
        // `Url` hides a port equal to the scheme's default, so `:80` is looked for here.
        let port = match url.port() {
            Some(port) => port,
            None if names_port(&with_scheme) => 80,
            None => DEFAULT_PROXY_PORT,
        };
        let has_credentials = !url.username().is_empty() || url.password().is_some();
        // The userinfo stays percent-encoded as written; the matcher decodes it.
        let userinfo = match (url.username(), url.password()) {
            ("", None) => String::new(),
            (user, None) => format!("{user}@"),
            (user, Some(pass)) => format!("{user}:{pass}@"),
        };
        Ok(Self {
            url: Secret::new(format!("http://{userinfo}{host}:{port}")),
            shown: format!(
                "http://{}{host}:{port}",
                if has_credentials { "***@" } else { "" }
            ),
        })
    }

    /// The URL with its credentials: only for building the clients.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// `http://***@host:port` (or `http://host:port` without credentials).
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Debug for OutboundProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundProxy")
            .field("http", &self.http)
            .field("https", &self.https)
            .field("no_proxy", &self.no_proxy)
            .field("from_env", &self.from_env)
            .finish()
    }
}

impl OutboundProxy {
    /// The matcher both clients consult: which proxy (if any) a destination goes through.
    pub fn matcher(&self) -> Matcher {
        let mut builder = Matcher::builder().no(self.no_proxy.join(","));
        if let Some(p) = &self.http {
            builder = builder.http(p.expose().to_owned());
        }
        if let Some(p) = &self.https {
            builder = builder.https(p.expose().to_owned());
        }
        builder.build()
    }

    /// One line for `check`: the proxies without credentials, and the direct hosts.
    pub fn describe(&self) -> String {
        let source = if self.from_env {
            "from the environment"
        } else {
            "outbound_proxy"
        };
        let show = |p: &Option<ProxyUrl>| p.as_ref().map_or("direct", |p| p.shown()).to_owned();
        let direct = if self.no_proxy.is_empty() {
            "none".to_owned()
        } else {
            self.no_proxy.join(", ")
        };
        if self.http == self.https {
            format!(
                "outbound proxy ({source}): {}; direct: {direct}",
                show(&self.https)
            )
        } else {
            format!(
                "outbound proxy ({source}): https:// via {}, http:// via {}; direct: {direct}",
                show(&self.https),
                show(&self.http)
            )
        }
    }

    /// Resolves `outbound_proxy = "env"` like curl: `HTTPS_PROXY`, `HTTP_PROXY`, each
    /// falling back to `ALL_PROXY`, and `NO_PROXY` (upper case first, then lower case).
    /// `no_proxy` from the file is added to `NO_PROXY`. `None`: no proxy variable is set.
    pub fn from_env(
        env: &dyn Fn(&str) -> Option<String>,
        no_proxy: Vec<String>,
    ) -> Result<Option<Self>, String> {
        let var = |names: [&str; 2]| -> Option<(String, String)> {
            names.iter().find_map(|name| {
                env(name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| ((*name).to_owned(), v))
            })
        };
        let parse = |found: Option<(String, String)>| -> Result<Option<ProxyUrl>, String> {
            found
                .map(|(name, value)| {
                    ProxyUrl::parse(&value, true).map_err(|problem| format!("{name} {problem}"))
                })
                .transpose()
        };
        let all = parse(var(["ALL_PROXY", "all_proxy"]))?;
        let https = parse(var(["HTTPS_PROXY", "https_proxy"]))?.or_else(|| all.clone());
        let http = parse(var(["HTTP_PROXY", "http_proxy"]))?.or(all);
        if http.is_none() && https.is_none() {
            return Ok(None);
        }
        let mut hosts: Vec<String> = var(["NO_PROXY", "no_proxy"])
            .map(|(_, v)| {
                v.split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        hosts.extend(no_proxy);
        Ok(Some(Self {
            http,
            https,
            no_proxy: hosts,
            from_env: true,
        }))
    }
}

/// True when the URL's authority ends in `:port`.
fn names_port(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    host_port.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty() && (!host.starts_with('[') || host.ends_with(']'))
    })
}

/// Checks one `no_proxy` entry: `*`, an IP, a CIDR, a host name or a `.suffix` domain.
pub fn check_no_proxy_entry(entry: &str) -> Result<String, String> {
    let entry = entry.trim();
    if entry == "*"
        || entry.parse::<ipnet::IpNet>().is_ok()
        || entry.parse::<std::net::IpAddr>().is_ok()
    {
        return Ok(entry.to_owned());
    }
    let name = entry.strip_prefix('.').unwrap_or(entry);
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if valid {
        Ok(entry.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{entry}` is not a host, .domain, IP address, CIDR or `*` (no ports, schemes or wildcards other than `*`)"
        ))
    }
}

/// The proxy a matched destination goes through, as it may be shown: `http://***@host:port`.
pub fn shown(intercept: &Intercept) -> String {
    let authority = intercept
        .uri()
        .authority()
        .map_or("(unknown)", |a| a.as_str());
    if intercept.basic_auth().is_some() {
        format!("http://***@{authority}")
    } else {
        format!("http://{authority}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized_and_shown_without_credentials() {
        let p = ProxyUrl::parse("http://user:p%40ss@proxy.corp:3128", false).unwrap();
        assert_eq!(p.expose(), "http://user:p%40ss@proxy.corp:3128");
        assert_eq!(p.shown(), "http://***@proxy.corp:3128");
        assert_eq!(format!("{p:?}"), "http://***@proxy.corp:3128");
        let p = ProxyUrl::parse("proxy.corp", true).unwrap();
        assert_eq!(p.expose(), "http://proxy.corp:1080");
        let p = ProxyUrl::parse("http://proxy.corp:80/", false).unwrap();
        assert_eq!(p.expose(), "http://proxy.corp:80");
        let p = ProxyUrl::parse("http://[::1]:3128", false).unwrap();
        assert_eq!(p.shown(), "http://[::1]:3128");
        assert!(ProxyUrl::parse("proxy.corp:3128", false).is_err());
        let err = ProxyUrl::parse("https://u:hunter2@proxy:3128", false).unwrap_err();
        assert!(
            err.contains("not supported") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(ProxyUrl::parse("socks5://proxy:1080", true).is_err());
        assert!(ProxyUrl::parse("http://proxy:3128/path", false).is_err());
        let err = ProxyUrl::parse("http://u:hunter2@", false).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn env_resolution_follows_curl() {
        let env = |name: &str| match name {
            "https_proxy" => Some("http://a:b@secure:3128".to_owned()),
            "ALL_PROXY" => Some("fallback:8080".to_owned()),
            "no_proxy" => Some("localhost, .corp.example,,10.0.0.0/8".to_owned()),
            _ => None,
        };
        let p = OutboundProxy::from_env(&env, vec!["extra.host".to_owned()])
            .unwrap()
            .unwrap();
        assert_eq!(p.https.unwrap().shown(), "http://***@secure:3128");
        assert_eq!(p.http.unwrap().shown(), "http://fallback:8080");
        assert_eq!(
            p.no_proxy,
            ["localhost", ".corp.example", "10.0.0.0/8", "extra.host"]
        );
        assert!(OutboundProxy::from_env(&|_| None, vec![])
            .unwrap()
            .is_none());
        let bad = |name: &str| (name == "HTTPS_PROXY").then(|| "ftp://u:pw12345@x".to_owned());
        let err = OutboundProxy::from_env(&bad, vec![]).unwrap_err();
        assert!(
            err.starts_with("HTTPS_PROXY") && !err.contains("pw12345"),
            "{err}"
        );
    }

    #[test]
    fn matcher_applies_no_proxy_rules() {
        let url = ProxyUrl::parse("http://u:p@proxy:3128", false).unwrap();
        let p = OutboundProxy {
            http: Some(url.clone()),
            https: Some(url),
            no_proxy: vec![
                "localhost".into(),
                ".corp.example".into(),
                "10.0.0.0/8".into(),
                "192.168.1.7".into(),
            ],
            from_env: false,
        };
        let m = p.matcher();
        let via = |u: &str| m.intercept(&u.parse().unwrap()).map(|i| shown(&i));
        assert_eq!(
            via("https://api.example.com/").as_deref(),
            Some("http://***@proxy:3128")
        );
        assert_eq!(
            via("http://api.example.com/").as_deref(),
            Some("http://***@proxy:3128")
        );
        assert_eq!(via("https://localhost:8443/"), None);
        assert_eq!(via("https://a.b.corp.example/"), None);
        assert_eq!(via("https://corp.example/"), None);
        assert!(via("https://notcorp.example/").is_some());
        assert_eq!(via("https://10.2.3.4/"), None);
        assert_eq!(via("https://192.168.1.7/"), None);
        assert!(via("https://192.168.1.8/").is_some());
        let all = OutboundProxy {
            no_proxy: vec!["*".into()],
            ..p
        };
        assert!(all
            .matcher()
            .intercept(&"https://x.y/".parse().unwrap())
            .is_none());
    }

    #[test]
    fn no_proxy_entries_are_checked() {
        for ok in [
            "*",
            "localhost",
            ".corp.example",
            "10.0.0.0/8",
            "::1",
            "api-1.x.io",
        ] {
            assert!(check_no_proxy_entry(ok).is_ok(), "{ok}");
        }
        for bad in ["", "http://x", "x:80", "*.corp", "a b", "a,b", "."] {
            assert!(check_no_proxy_entry(bad).is_err(), "{bad:?}");
        }
    }
}
