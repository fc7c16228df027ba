//! Parsing of single config values: `${VAR}` interpolation, durations, sizes, addresses.

use std::net::SocketAddr;
use std::time::Duration;

/// Expands `${NAME}` from `env` and `$${` to a literal `${`.
///
/// Errors are a sentence naming the missing variable; the caller adds the key.
pub fn interpolate(raw: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !raw.contains('$') {
        return Ok(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| "unterminated `${` (write `$${` for a literal `${`)".to_owned())?;
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable name"
                ));
            }
            let value =
                env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The longest duration any setting takes: longer ones are typos, and capping them
/// keeps every deadline computed from them far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"24h"` (at most a year).
pub fn duration(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value.trim())
        .map_err(|e| format!("`{value}` is not a duration like \"30s\" or \"5m\" ({e})"))?;
    if d > MAX_DURATION {
        return Err(format!("`{value}` is longer than a year"));
    }
    Ok(d)
}

/// Parses `"64KiB"`, `"1MiB"`, or a plain number of bytes.
pub fn size(value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<bytesize::ByteSize>()
        .map(|s| s.as_u64())
        .map_err(|_| format!("`{value}` is not a size like \"64KiB\" or \"1MiB\""))
}

/// Parses `ip:port`; `localhost:port` is accepted as 127.0.0.1.
pub fn socket_addr(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    if let Some(port) = value.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{value}` has no valid port"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    value
        .parse()
        .map_err(|_| format!("`{value}` is not an address like \"127.0.0.1:8080\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "A").then(|| "alpha".to_owned())
    }

    #[test]
    fn interpolation() {
        assert_eq!(interpolate("x${A}y", &env).unwrap(), "xalphay");
        assert_eq!(interpolate("$${A}", &env).unwrap(), "${A}");
        assert_eq!(interpolate("cost $5", &env).unwrap(), "cost $5");
        assert!(interpolate("${B}", &env)
            .unwrap_err()
            .contains("B is not set"));
        assert!(interpolate("${A", &env)
            .unwrap_err()
            .contains("unterminated"));
    }

    #[test]
    fn units() {
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(duration("soon").is_err());
        assert_eq!(size("64KiB").unwrap(), 64 * 1024);
        assert_eq!(size("1MiB").unwrap(), 1024 * 1024);
        assert_eq!(size("100").unwrap(), 100);
        assert!(size("lots").is_err());
        assert_eq!(socket_addr("localhost:80").unwrap().port(), 80);
    }
}
