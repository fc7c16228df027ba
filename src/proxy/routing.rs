//! Picks the route for a request on one listener: host, then longest path prefix.

use std::sync::Arc;

use crate::config::RouteConfig;
use crate::metrics::RouteMetrics;
use crate::token::{KeyedProvider, ProviderSlot};

use super::client::Pinned;

/// A route with its provider's slot resolved once, at build time.
pub struct Route {
    pub config: RouteConfig,
    pub auth: RouteAuth,
    pub metrics: RouteMetrics,
    /// The route's name, shared with log lines.
    pub name: Arc<str>,
    /// `preserve_host` routes: clients whose connections always go to this route's
    /// upstream, so the client's Host can be sent as the authority.
    pub pinned: Option<Pinned>,
}

/// Where a route's token comes from.
pub enum RouteAuth {
    /// No provider: requests go upstream as the client sent them.
    Open,
    /// One provider slot for every request.
    Slot(Arc<ProviderSlot>),
    /// A keyed provider: each request's key picks the slot.
    Keyed(Arc<KeyedProvider>),
}

/// The routes of one listener, most specific first.
pub struct Router {
    routes: Vec<Route>,
    /// Whether any route matches on `host`; when none does, requests skip host parsing.
    has_hosts: bool,
}

impl Router {
    /// Orders routes so the first match is the right one: longest prefix, and at equal
    /// length a route with a `host` before one without.
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| {
            b.config
                .path_prefix
                .len()
                .cmp(&a.config.path_prefix.len())
                .then(b.config.host.is_some().cmp(&a.config.host.is_some()))
        });
        let has_hosts = routes.iter().any(|r| r.config.host.is_some());
        Self { routes, has_hosts }
    }

    /// True when some route has a `host`.
    pub fn has_hosts(&self) -> bool {
        self.has_hosts
    }

    /// The route for `host` (lower-case, no port) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            r.config
                .host
                .as_deref()
                .is_none_or(|h| host.is_some_and(|rh| rh.eq_ignore_ascii_case(h)))
                && prefix_matches(&r.config.path_prefix, path)
        })
    }
}

/// True when `path` is `prefix` or continues it at a `/`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The path sent upstream: base path + request path (with the prefix cut when `strip`).
pub fn upstream_path(base: &str, prefix: &str, path: &str, strip: bool) -> String {
    let rest = if strip && prefix != "/" {
        path.strip_prefix(prefix).unwrap_or(path)
    } else {
        path
    };
    let mut out = String::with_capacity(base.len() + rest.len() + 1);
    out.push_str(base);
    out.push_str(rest);
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    out
}

/// The request's host without port, lower-cased; `None` when absent or unparsable.
pub fn host_without_port(authority: &str) -> Option<String> {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        &authority[..end + 2]
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_at_segment_boundary() {
        assert!(prefix_matches("/wll", "/wll"));
        assert!(prefix_matches("/wll", "/wll/"));
        assert!(prefix_matches("/wll", "/wll/x"));
        assert!(!prefix_matches("/wll", "/wllx"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn joins_base_and_rest() {
        assert_eq!(
            upstream_path("/api/v1", "/wll", "/wll/users", true),
            "/api/v1/users"
        );
        assert_eq!(upstream_path("/api/v1", "/wll", "/wll", true), "/api/v1");
        assert_eq!(upstream_path("", "/wll", "/wll", true), "/");
        assert_eq!(upstream_path("", "/wll", "/wll/a", false), "/wll/a");
        assert_eq!(upstream_path("/base", "/", "/x", true), "/base/x");
        assert_eq!(upstream_path("", "/", "/", true), "/");
    }

    #[test]
    fn hosts() {
        assert_eq!(
            host_without_port("API.example.com:8080").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(host_without_port("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(host_without_port(""), None);
    }
}
