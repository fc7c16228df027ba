//! What every layer's errors share: the boxed error type hyper and tower services
//! speak, and the one-line rendering of an error with its causes.

/// A boxed error as hyper, hyper-util and tower services return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `error` and its causes on one line, `: `-separated (as anyhow's `{:#}` does), for
/// places that hand an error on as text: log lines, JSON answers, `FetchError`s.
/// hyper's and reqwest's top-level messages are vague; the causes say what happened.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // A transparent wrapper repeats its inner error's text: say it once.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read the file")]
        Read(#[source] std::io::Error),
        #[error(transparent)]
        Inner(#[from] std::io::Error),
    }

    #[test]
    fn causes_follow_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            chain(&Outer::Read(io())),
            "cannot read the file: no such file"
        );
        assert_eq!(chain(&Outer::Inner(io())), "no such file");
    }
}
