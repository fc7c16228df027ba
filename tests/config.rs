//! Config validation through `Config::parse`: every error names the file, the key and
//! the problem; secrets never reach `Debug`.

use std::path::Path;
use std::time::Duration;

use bearer_proxy::config::{Config, ConfigError, RefreshBefore};

const SECRET: &str = "s3cr3t-value-from-env";

/// A small fixed environment.
fn env(name: &str) -> Option<String> {
    match name {
        "SECRET" => Some(SECRET.to_owned()),
        "CLIENT_ID" => Some("client-from-env".to_owned()),
        "API_HOST" => Some("api.example.com".to_owned()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("x.toml"), &env)
}

#[track_caller]
fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got: {e}\n--- config ---\n{text}"),
    }
}

/// Parses `text`, expects an error, checks its message names the file and holds every
/// one of `needles`, and returns the message.
#[track_caller]
fn fails(text: &str, needles: &[&str]) -> String {
    let msg = match parse(text) {
        Ok(_) => panic!("expected a config error\n--- config ---\n{text}"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("x.toml"),
        "message does not name the file: {msg}"
    );
    for needle in needles {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }
    assert!(!msg.contains(SECRET), "message leaks the secret: {msg}");
    eprintln!("{msg}");
    msg
}

/// A valid config with `server` lines in [server], `provider` lines in [providers.p],
/// and `routes` appended (one default route when empty).
fn cfg(server: &str, provider: &str, routes: &str) -> String {
    let routes = if routes.is_empty() { ROUTE } else { routes };
    format!(
        r#"
[server]
listen = "127.0.0.1:8080"
{server}

[providers.p]
token_url = "https://auth.example.com/oauth/token"
client_id = "${{CLIENT_ID}}"
client_secret = "${{SECRET}}"
{provider}

{routes}
"#
    )
}

const ROUTE: &str = r#"
[[routes]]
path_prefix = "/api"
upstream = "https://api.example.com/v1"
provider = "p"
"#;

/// A route block with these extra lines.
fn route(lines: &str) -> String {
    format!("\n[[routes]]\nupstream = \"https://api.example.com/v1\"\nprovider = \"p\"\n{lines}\n")
}

#[test]
fn a_valid_config_parses_with_env_values() {
    let c = ok(&cfg("", r#"audience = "https://${API_HOST}""#, ""));
    let p = &c.providers["p"];
    assert_eq!(p.client_id, "client-from-env");
    assert_eq!(p.client_secret.current().expose(), SECRET);
    assert_eq!(p.audience.as_deref(), Some("https://api.example.com"));
    assert_eq!(c.routes.len(), 1);
    assert_eq!(c.routes[0].path_prefix, "/api");
    assert_eq!(c.routes[0].provider.as_deref(), Some("p"));
    assert_eq!(c.routes[0].listen, "127.0.0.1:8080".parse().unwrap());
}

// === Unknown keys ===

#[test]
fn unknown_top_level_key_is_an_error() {
    let text = format!("lisen = \"127.0.0.1:1\"\n{}", cfg("", "", ""));
    fails(&text, &["lisen", "unknown"]);
}

#[test]
fn unknown_top_level_table_is_an_error() {
    let text = format!("{}\n[servr]\nlisten = \"127.0.0.1:1\"\n", cfg("", "", ""));
    fails(&text, &["servr", "unknown"]);
}

#[test]
fn unknown_key_in_server_is_an_error() {
    fails(
        &cfg(r#"upstream_timeot = "5s""#, "", ""),
        &["upstream_timeot", "unknown", "`server`"],
    );
}

#[test]
fn unknown_key_in_provider_is_an_error() {
    fails(
        &cfg("", r#"audiance = "x""#, ""),
        &["audiance", "unknown", "providers.p"],
    );
}

#[test]
fn unknown_key_in_route_is_an_error() {
    fails(
        &cfg("", "", &route(r#"path-prefix = "/x""#)),
        &["path-prefix", "unknown", "routes"],
    );
}

#[test]
fn unknown_key_in_store_is_an_error() {
    let text = format!(
        "{}\n[store]\nbackend = \"memory\"\nredis_ur = \"x\"\n",
        cfg("", "", "")
    );
    fails(&text, &["redis_ur", "unknown", "`store`"]);
}

#[test]
fn toml_syntax_error_names_the_file() {
    fails("[server\nlisten = 1", &[]);
}

#[test]
fn syntax_errors_give_line_and_column_but_never_quote_a_secret() {
    // An unterminated string on the secret's line.
    let text = "[providers.p]\ntoken_url = \"https://auth.example.com/t\"\nclient_id = \"id\"\nclient_secret = \"literal-secret-123\n";
    let msg = fails(text, &["line 4"]);
    assert!(
        !msg.contains("literal-secret-123"),
        "syntax error quotes the secret: {msg}"
    );
    // A typo on the line after the secret.
    let text = cfg("", "", "").replace("${SECRET}", "literal-secret-123") + "\n[server2]\n";
    let msg = fails(&text, &["server2", "unknown"]);
    assert!(!msg.contains("literal-secret-123"), "{msg}");
    // A secret written without quotes.
    let text = cfg("", "", "").replace("\"${SECRET}\"", "literal-secret-123");
    let msg = fails(&text, &["line"]);
    assert!(
        !msg.contains("literal-secret-123"),
        "syntax error quotes the secret: {msg}"
    );
}

// === ${VAR} ===

#[test]
fn missing_env_var_names_the_variable_and_the_key() {
    let text = cfg("", "", "").replace("${SECRET}", "${NO_SUCH_SECRET}");
    fails(
        &text,
        &["NO_SUCH_SECRET", "providers.p.client_secret", "not set"],
    );
}

#[test]
fn missing_env_var_in_a_route_names_the_route_key() {
    let text = cfg(
        "",
        "",
        "[[routes]]\nupstream = \"https://${NO_SUCH_HOST}/v1\"\nprovider = \"p\"\n",
    );
    fails(&text, &["NO_SUCH_HOST", "routes[0].upstream"]);
}

#[test]
fn missing_env_var_in_server_names_the_key() {
    fails(
        &cfg(r#"admin_listen = "${ADMIN_ADDR}""#, "", ""),
        &["ADMIN_ADDR", "server.admin_listen"],
    );
}

#[test]
fn double_dollar_writes_a_literal_interpolation() {
    let c = ok(&cfg(
        "",
        r#"audience = "a$${B}c"
scope = "$${SECRET} and ${API_HOST} cost $5""#,
        "",
    ));
    let p = &c.providers["p"];
    assert_eq!(p.audience.as_deref(), Some("a${B}c"));
    assert_eq!(
        p.scope.as_deref(),
        Some("${SECRET} and api.example.com cost $5")
    );
}

#[test]
fn double_dollar_in_a_secret_is_literal_too() {
    let text = cfg("", "", "").replace("${SECRET}", "pre$${X}post");
    let c = ok(&text);
    assert_eq!(
        c.providers["p"].client_secret.current().expose(),
        "pre${X}post"
    );
}

#[test]
fn unterminated_interpolation_is_an_error() {
    let text = cfg("", r#"audience = "${API_HOST""#, "");
    fails(&text, &["providers.p.audience", "unterminated"]);
}

// === client_secret / client_secret_file ===

const NO_SECRET: &str = r#"
[providers.p]
token_url = "https://auth.example.com/oauth/token"
client_id = "id"
"#;

fn provider_only(provider: &str) -> String {
    format!("{provider}\n{ROUTE}")
}

#[test]
fn both_client_secret_and_file_is_an_error() {
    let text = provider_only(&format!(
        "{NO_SECRET}client_secret = \"${{SECRET}}\"\nclient_secret_file = \"/nonexistent/secret\"\n"
    ));
    fails(
        &text,
        &["providers.p.client_secret", "client_secret_file", "both"],
    );
}

#[test]
fn neither_client_secret_nor_file_is_an_error() {
    fails(
        &provider_only(NO_SECRET),
        &["providers.p.client_secret", "required"],
    );
}

#[test]
fn empty_client_secret_is_an_error() {
    let text = provider_only(&format!("{NO_SECRET}client_secret = \"\"\n"));
    fails(&text, &["providers.p.client_secret", "empty"]);
}

#[test]
fn client_secret_file_is_read_and_its_trailing_newline_trimmed() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, b"file-secret-value\n").unwrap();
    let text = provider_only(&format!(
        "{NO_SECRET}client_secret_file = \"{}\"\n",
        file.path().display()
    ));
    let c = ok(&text);
    assert_eq!(
        c.providers["p"].client_secret.current().expose(),
        "file-secret-value"
    );
    assert!(!format!("{c:?}").contains("file-secret-value"));
}

#[test]
fn client_secret_file_crlf_is_trimmed() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, b"crlf-secret\r\n").unwrap();
    let text = provider_only(&format!(
        "{NO_SECRET}client_secret_file = \"{}\"\n",
        file.path().display()
    ));
    assert_eq!(
        ok(&text).providers["p"].client_secret.current().expose(),
        "crlf-secret"
    );
}

#[test]
fn client_secret_file_is_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "relative-secret\n").unwrap();
    let text = provider_only(&format!("{NO_SECRET}client_secret_file = \"secret.txt\"\n"));
    let c = Config::parse(&text, &dir.path().join("x.toml"), &env).unwrap();
    assert_eq!(
        c.providers["p"].client_secret.current().expose(),
        "relative-secret"
    );
}

#[test]
fn unreadable_client_secret_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-secret");
    let text = provider_only(&format!(
        "{NO_SECRET}client_secret_file = \"{}\"\n",
        missing.display()
    ));
    fails(&text, &["providers.p.client_secret_file", "missing-secret"]);
}

#[test]
fn empty_client_secret_file_is_an_error() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "\n").unwrap();
    let text = provider_only(&format!(
        "{NO_SECRET}client_secret_file = \"{}\"\n",
        file.path().display()
    ));
    fails(&text, &["providers.p.client_secret", "empty"]);
}

// === URLs ===

fn with_token_url(url: &str) -> String {
    cfg("", "", "").replace("https://auth.example.com/oauth/token", url)
}

fn with_upstream(url: &str) -> String {
    cfg("", "", "").replace("https://api.example.com/v1", url)
}

#[test]
fn token_url_that_is_not_a_url_is_an_error() {
    fails(
        &with_token_url("not a url"),
        &["providers.p.token_url", "not a url", "not a valid URL"],
    );
}

#[test]
fn token_url_with_ftp_scheme_is_an_error() {
    fails(
        &with_token_url("ftp://auth.example.com/token"),
        &[
            "providers.p.token_url",
            "ftp://auth.example.com/token",
            "http",
        ],
    );
}

#[test]
fn token_url_without_host_is_an_error() {
    fails(
        &with_token_url("https://"),
        &["providers.p.token_url", "host"],
    );
    fails(
        &with_token_url("https://:443/token"),
        &["providers.p.token_url", "host"],
    );
}

#[test]
fn token_url_is_required() {
    let text =
        cfg("", "", "").replace("token_url = \"https://auth.example.com/oauth/token\"\n", "");
    fails(&text, &["providers.p.token_url", "required"]);
}

#[test]
fn token_url_with_credentials_is_an_error() {
    fails(
        &with_token_url("https://user:pw@auth.example.com/token"),
        &["providers.p.token_url", "credentials"],
    );
}

#[test]
fn upstream_that_is_not_a_url_is_an_error() {
    fails(
        &with_upstream("api.example.com/v1"),
        &["routes[0].upstream", "not a valid URL"],
    );
}

#[test]
fn upstream_with_ftp_scheme_is_an_error() {
    fails(
        &with_upstream("ftp://api.example.com/v1"),
        &["routes[0].upstream", "http"],
    );
}

#[test]
fn upstream_without_host_is_an_error() {
    fails(&with_upstream("http://"), &["routes[0].upstream", "host"]);
}

#[test]
fn upstream_with_query_is_an_error() {
    fails(
        &with_upstream("https://api.example.com/v1?x=1"),
        &["routes[0].upstream", "query"],
    );
}

#[test]
fn upstream_is_required() {
    let text = cfg("", "", "[[routes]]\nprovider = \"p\"\n");
    fails(&text, &["routes[0].upstream", "required"]);
}

#[test]
fn no_routes_is_an_error() {
    let text = cfg("", "", "").replace(ROUTE, "");
    fails(&text, &["routes"]);
}

#[test]
fn http_token_url_to_a_remote_host_needs_allow_insecure_token_url() {
    fails(
        &with_token_url("http://auth.example.com/oauth/token"),
        &[
            "providers.p.token_url",
            "http://",
            "allow_insecure_token_url",
        ],
    );
    let text = with_token_url("http://auth.example.com/oauth/token")
        .replace("[server]\n", "[server]\nallow_insecure_token_url = true\n");
    ok(&text);
}

#[test]
fn http_token_url_to_loopback_is_fine() {
    ok(&with_token_url("http://127.0.0.1:9000/oauth/token"));
    ok(&with_token_url("http://localhost:9000/oauth/token"));
    ok(&with_token_url("http://[::1]:9000/oauth/token"));
}

// === Listeners ===

#[test]
fn non_loopback_listen_needs_allow_non_loopback() {
    let text = cfg("", "", "").replace("127.0.0.1:8080", "0.0.0.0:8080");
    fails(
        &text,
        &[
            "server.listen",
            "0.0.0.0:8080",
            "loopback",
            "allow_non_loopback",
        ],
    );
    let text = text.replace("[server]\n", "[server]\nallow_non_loopback = true\n");
    let c = ok(&text);
    assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert!(c.server.allow_non_loopback);
}

#[test]
fn non_loopback_admin_listen_needs_allow_non_loopback() {
    fails(
        &cfg(r#"admin_listen = "192.168.1.5:9090""#, "", ""),
        &["server.admin_listen", "192.168.1.5:9090", "loopback"],
    );
    let c = ok(&cfg(
        "admin_listen = \"192.168.1.5:9090\"\nallow_non_loopback = true",
        "",
        "",
    ));
    assert_eq!(
        c.server.admin_listen,
        Some("192.168.1.5:9090".parse().unwrap())
    );
}

#[test]
fn non_loopback_route_listen_needs_allow_non_loopback() {
    fails(
        &cfg("", "", &route(r#"listen = "10.0.0.1:8082""#)),
        &["routes[0].listen", "10.0.0.1:8082", "loopback"],
    );
    fails(
        &cfg("", "", &route(r#"listen = "[::]:8082""#)),
        &["routes[0].listen", "loopback"],
    );
    let c = ok(&cfg(
        "allow_non_loopback = true",
        "",
        &route(r#"listen = "10.0.0.1:8082""#),
    ));
    assert_eq!(c.routes[0].listen, "10.0.0.1:8082".parse().unwrap());
}

#[test]
fn loopback_listeners_are_fine() {
    let c = ok(&cfg(
        r#"admin_listen = "[::1]:9090""#,
        "",
        &route(r#"listen = "localhost:8082""#),
    ));
    assert_eq!(c.routes[0].listen, "127.0.0.1:8082".parse().unwrap());
    assert_eq!(c.server.admin_listen, Some("[::1]:9090".parse().unwrap()));
}

#[test]
fn bad_listen_address_is_an_error() {
    fails(
        &cfg("", "", "").replace("127.0.0.1:8080", "127.0.0.1"),
        &["server.listen", "127.0.0.1"],
    );
    fails(
        &cfg("", "", &route(r#"listen = "nowhere:80""#)),
        &["routes[0].listen", "nowhere:80"],
    );
}

// === Routes that cannot be told apart ===

#[test]
fn two_routes_with_the_same_prefix_are_an_error() {
    let routes = format!(
        "{}{}",
        route(r#"path_prefix = "/wll""#),
        route(r#"path_prefix = "/wll""#)
    );
    fails(&cfg("", "", &routes), &["routes[1]", "/wll", "told apart"]);
}

#[test]
fn a_trailing_slash_does_not_tell_routes_apart() {
    let routes = format!(
        "{}{}",
        route(r#"path_prefix = "/wll""#),
        route(r#"path_prefix = "/wll/""#)
    );
    fails(&cfg("", "", &routes), &["routes[1]", "/wll"]);
}

#[test]
fn two_catch_all_routes_are_an_error() {
    let routes = format!("{}{}", route(""), route(r#"path_prefix = "/""#));
    fails(&cfg("", "", &routes), &["routes[1]"]);
}

#[test]
fn same_prefix_and_host_in_any_case_is_an_error() {
    let routes = format!(
        "{}{}",
        route("host = \"API.example.com\"\npath_prefix = \"/wll\""),
        route("host = \"api.example.com\"\npath_prefix = \"/wll\""),
    );
    fails(&cfg("", "", &routes), &["routes[1]", "api.example.com"]);
}

#[test]
fn the_default_listener_named_explicitly_is_the_same_listener() {
    let routes = format!(
        "{}{}",
        route(r#"path_prefix = "/wll""#),
        route("listen = \"127.0.0.1:8080\"\npath_prefix = \"/wll\""),
    );
    fails(&cfg("", "", &routes), &["routes[1]"]);
    let routes = format!(
        "{}{}",
        route(r#"path_prefix = "/wll""#),
        route("listen = \"localhost:8080\"\npath_prefix = \"/wll/\""),
    );
    fails(&cfg("", "", &routes), &["routes[1]"]);
}

#[test]
fn same_prefix_with_different_hosts_is_fine() {
    let routes = format!(
        "{}{}{}",
        route("host = \"a.example.com\"\npath_prefix = \"/wll\""),
        route("host = \"b.example.com\"\npath_prefix = \"/wll\""),
        route(r#"path_prefix = "/wll""#),
    );
    let c = ok(&cfg("", "", &routes));
    assert_eq!(c.routes.len(), 3);
    assert_eq!(c.routes[0].host.as_deref(), Some("a.example.com"));
}

#[test]
fn same_prefix_on_different_listeners_is_fine() {
    let routes = format!(
        "{}{}{}",
        route(r#"path_prefix = "/wll""#),
        route("listen = \"127.0.0.1:8082\"\npath_prefix = \"/wll\""),
        route("listen = \"127.0.0.1:8083\"\npath_prefix = \"/wll\""),
    );
    let c = ok(&cfg("", "", &routes));
    assert_eq!(c.listen_addrs().len(), 3);
}

#[test]
fn nested_prefixes_are_fine() {
    let routes = format!(
        "{}{}{}",
        route(r#"path_prefix = "/wll""#),
        route(r#"path_prefix = "/wll/special/""#),
        route(""),
    );
    let c = ok(&cfg("", "", &routes));
    let prefixes: Vec<&str> = c.routes.iter().map(|r| r.path_prefix.as_str()).collect();
    assert_eq!(prefixes, ["/wll", "/wll/special", "/"]);
}

#[test]
fn path_prefix_must_start_with_a_slash() {
    fails(
        &cfg("", "", &route(r#"path_prefix = "wll""#)),
        &["routes[0].path_prefix", "wll"],
    );
}

#[test]
fn a_route_naming_an_unknown_provider_is_an_error() {
    let text = cfg(
        "",
        "",
        "[[routes]]\nupstream = \"https://api.example.com\"\nprovider = \"nope\"\n",
    );
    fails(&text, &["routes[0].provider", "nope", "p"]);
}

#[test]
fn a_route_without_provider_is_fine() {
    let c = ok(&cfg(
        "",
        "",
        "[[routes]]\nupstream = \"https://api.example.com\"\n",
    ));
    assert_eq!(c.routes[0].provider, None);
}

// === Durations and sizes ===

#[test]
fn durations_and_sizes_parse() {
    let c = ok(&cfg(
        "token_wait = \"250ms\"\nupstream_timeout = \"5m\"\nshutdown_grace = \"24h\"\nmax_replay_body = \"64KiB\"",
        r#"default_lifetime = "30s""#,
        "",
    ));
    assert_eq!(c.server.token_wait, Duration::from_millis(250));
    assert_eq!(c.server.upstream_timeout, Duration::from_secs(300));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(86_400));
    assert_eq!(c.server.max_replay_body, 64 * 1024);
    assert_eq!(c.providers["p"].default_lifetime, Duration::from_secs(30));
    let c = ok(&cfg(r#"max_replay_body = "1MiB""#, "", ""));
    assert_eq!(c.server.max_replay_body, 1024 * 1024);
}

#[test]
fn bad_duration_is_an_error() {
    fails(
        &cfg(r#"token_wait = "soon""#, "", ""),
        &["server.token_wait", "soon", "duration"],
    );
    fails(
        &cfg(r#"connect_timeout = "10""#, "", ""),
        &["server.connect_timeout", "duration"],
    );
    fails(
        &cfg("", r#"default_lifetime = "forever""#, ""),
        &["providers.p.default_lifetime", "forever"],
    );
}

#[test]
fn zero_timeout_is_an_error() {
    fails(
        &cfg(r#"upstream_timeout = "0s""#, "", ""),
        &["server.upstream_timeout", "zero"],
    );
}

#[test]
fn bad_size_is_an_error() {
    fails(
        &cfg(r#"max_replay_body = "lots""#, "", ""),
        &["server.max_replay_body", "lots", "size"],
    );
}

#[test]
fn a_duration_of_the_wrong_toml_type_is_an_error() {
    fails(
        &cfg("token_wait = 10", "", ""),
        &["server.token_wait", "line 4"],
    );
}

// === Provider settings ===

#[test]
fn refresh_before_takes_a_percentage_or_a_duration() {
    let c = ok(&cfg("", r#"refresh_before = "10%""#, ""));
    assert_eq!(
        c.providers["p"].refresh_before,
        RefreshBefore::Fraction(0.1)
    );
    let c = ok(&cfg("", r#"refresh_before = "30s""#, ""));
    assert_eq!(
        c.providers["p"].refresh_before,
        RefreshBefore::Duration(Duration::from_secs(30))
    );
    let c = ok(&cfg("", "", ""));
    assert_eq!(
        c.providers["p"].refresh_before,
        RefreshBefore::Fraction(0.1)
    );
}

#[test]
fn refresh_before_over_the_lifetime_is_an_error() {
    fails(
        &cfg("", r#"refresh_before = "150%""#, ""),
        &["providers.p.refresh_before", "150%"],
    );
    fails(
        &cfg("", r#"refresh_before = "soon""#, ""),
        &["providers.p.refresh_before", "soon"],
    );
}

#[test]
fn invalidate_on_a_success_status_is_an_error() {
    fails(
        &cfg("", "invalidate_on = [401, 200]", ""),
        &["providers.p.invalidate_on", "200"],
    );
    fails(
        &cfg("", "invalidate_on = [999]", ""),
        &["providers.p.invalidate_on", "999"],
    );
    let c = ok(&cfg("", "invalidate_on = [401, 403]", ""));
    let codes: Vec<u16> = c.providers["p"]
        .invalidate_on
        .iter()
        .map(|s| s.as_u16())
        .collect();
    assert_eq!(codes, [401, 403]);
}

#[test]
fn enumerated_settings_reject_other_values() {
    fails(
        &cfg("", r#"request_format = "xml""#, ""),
        &["providers.p.request_format", "xml"],
    );
    fails(
        &cfg("", r#"client_auth = "digest""#, ""),
        &["providers.p.client_auth", "digest"],
    );
    fails(
        &cfg("", r#"token_field = "results..token""#, ""),
        &["providers.p.token_field"],
    );
    fails(
        &cfg("", r#"header = "bad header""#, ""),
        &["providers.p.header"],
    );
    fails(
        &cfg("", r#"extra_params = { client_secret = "x" }"#, ""),
        &["providers.p.extra_params.client_secret"],
    );
}

// === Secrets ===

#[test]
fn the_secret_never_appears_in_debug_output() {
    let c = ok(&cfg(
        "",
        r#"extra_params = { tenant = "t1" }
scope = "read""#,
        "",
    ));
    assert_eq!(c.providers["p"].client_secret.current().expose(), SECRET);
    let debug = format!("{c:?}");
    assert!(!debug.contains(SECRET), "Debug leaks the secret: {debug}");
    let pretty = format!("{c:#?}");
    assert!(!pretty.contains(SECRET), "Debug leaks the secret: {pretty}");
    let provider = format!("{:?}", c.providers["p"]);
    assert!(!provider.contains(SECRET));
}

// === The shipped examples ===

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no {} directory; nothing to check", dir.display());
        return;
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    // Examples that name key files get a throwaway key and certificate.
    let keys = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["client".to_owned()]).unwrap();
    let (key_file, cert_file) = (keys.path().join("k.pem"), keys.path().join("c.pem"));
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    let dummy = |name: &str| {
        Some(if name.ends_with("KEY_FILE") {
            key_file.display().to_string()
        } else if name.ends_with("CERT_FILE") {
            cert_file.display().to_string()
        } else {
            "dummy-value".to_owned()
        })
    };
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        if let Err(e) = Config::parse(&text, file, &dummy) {
            failures.push(e.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "example configs that do not validate:\n{}",
        failures.join("\n")
    );
}

#[test]
fn client_secret_file_must_be_a_small_regular_file() {
    let text = "[providers.p]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"i\"\nclient_secret_file = \"/dev/zero\"\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n";
    let err = bearer_proxy::config::Config::parse(text, Path::new("x.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("client_secret_file") && err.contains("not a regular file"),
        "{err}"
    );
}

#[test]
fn redis_store_needs_a_redis_url_and_never_quotes_it() {
    let base = "[providers.p]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n[[routes]]\nupstream = \"https://api.example\"\nprovider = \"p\"\n";
    let parse = |store: &str| {
        bearer_proxy::config::Config::parse(
            &format!("{store}\n{base}"),
            Path::new("x.toml"),
            &|_| None,
        )
    };
    assert!(
        parse("[store]\nbackend = \"redis\"\nredis_url = \"redis://:pw@127.0.0.1:6379/0\"").is_ok()
    );
    assert!(
        parse("[store]\nbackend = \"redis\"\nredis_url = \"rediss://:hunter2@db:6380\"").is_ok()
    );
    let err = parse("[store]\nbackend = \"redis\"\nredis_url = \"https://:hunter2@db:6380\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("store.redis_url") && !err.contains("hunter2"),
        "{err}"
    );
    let err = parse("[store]\nbackend = \"redis\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("store.redis_url") && err.contains("required"),
        "{err}"
    );
    let err = parse("[store]\nbackend = \"etcd\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("store.backend"), "{err}");
}

#[test]
fn unix_socket_listeners_and_their_keys() {
    use bearer_proxy::config::ListenAddr;
    let c = ok(&cfg(
        "admin_listen = \"unix:/run/bp/admin.sock\"\nunix_socket_mode = \"0660\"\nunix_socket_group = \"0\"\nallowed_uids = [1000, 0]",
        "",
        "[[routes]]\nupstream = \"https://api.example.com\"\nprovider = \"p\"\nlisten = \"unix:/run/bp/api.sock\"\n",
    ));
    assert_eq!(c.routes[0].listen, "unix:/run/bp/api.sock".parse().unwrap());
    assert_eq!(
        c.server.admin_listen,
        Some(ListenAddr::Unix("/run/bp/admin.sock".into()))
    );
    assert_eq!(c.server.unix_socket.mode, 0o660);
    assert_eq!(c.server.unix_socket.group, Some(0));
    assert_eq!(c.server.unix_socket.allowed_uids, Some(vec![1000, 0]));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Defaults: owner only, no uid check.
    let c = ok(&cfg("", "", ""));
    assert_eq!(c.server.unix_socket.mode, 0o600);
    assert_eq!(c.server.unix_socket.allowed_uids, None);

    fails(
        &cfg("unix_socket_mode = \"rw-rw----\"", "", ""),
        &["server.unix_socket_mode", "octal"],
    );
    fails(
        &cfg("unix_socket_mode = \"01777\"", "", ""),
        &["server.unix_socket_mode"],
    );
    fails(
        &cfg("unix_socket_group = \"no-such-group-here\"", "", ""),
        &["server.unix_socket_group", "no-such-group-here"],
    );
    fails(
        &cfg("allowed_uids = [-1]", "", ""),
        &["server.allowed_uids[0]"],
    );
    let long = format!("admin_listen = \"unix:/{}\"", "x".repeat(120));
    fails(&cfg(&long, "", ""), &["server.admin_listen", "107 bytes"]);
    fails(
        &cfg("admin_listen = \"unix:\"", "", ""),
        &["server.admin_listen", "socket path"],
    );
    fails(
        &cfg("admin_listen = \"127.0.0.1:8080\"", "", ""),
        &["server.admin_listen", "also a route listener"],
    );
    // A socket anyone may use, without a uid check, is worth a warning.
    let c = ok(&cfg(
        "listen = \"unix:/run/bp/api.sock\"\nunix_socket_mode = \"0666\"",
        "",
        "",
    )
    .replace("listen = \"127.0.0.1:8080\"\n", ""));
    assert!(
        c.warnings.iter().any(|w| w.contains("allowed_uids")),
        "{:?}",
        c.warnings
    );
}
