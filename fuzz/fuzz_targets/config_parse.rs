//! Config parsing and validation: any text gets `Ok` or a `ConfigError`, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |_: &str| Some("x".to_owned());
    if let Err(e) = bearer_proxy::config::Config::parse(text, Path::new("fuzz.toml"), &env) {
        // The message is what users see: rendering it must not panic either.
        let _ = e.to_string();
    }
});
