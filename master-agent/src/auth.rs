//! Who may drive the board: whoever wrote this boot's first token on the console.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use ferry_proto::AUTH_METADATA_KEY;
use tokio::sync::Notify;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// The token state shared by the console reader and the gRPC server.
#[derive(Debug, Default)]
pub struct Auth {
    token: RwLock<Option<String>>,
    answered: AtomicBool,
    notify: Notify,
}

/// What became of a token line for this boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// The boot's first token: calls must carry it from now on.
    Accepted,
    /// The token this boot already has, sent again (the dispatcher repeats
    /// its line until it authenticates): nothing changes.
    Repeated,
    /// A different token after the first: ignored, so nobody who can print
    /// a line on the console later can lock out or replace the dispatcher
    /// that holds this boot.
    Ignored,
}

/// Compares without an early exit, so timing does not leak the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// Offers a token seen on the console: the first one of the boot stays.
    pub fn set_token(&self, token: String) -> TokenUse {
        let Ok(mut t) = self.token.write() else {
            return TokenUse::Ignored;
        };
        match t.as_deref() {
            None => {
                *t = Some(token);
                TokenUse::Accepted
            }
            Some(have) if same(have.as_bytes(), token.as_bytes()) => TokenUse::Repeated,
            Some(_) => TokenUse::Ignored,
        }
    }

    /// Whether a dispatcher has made an authenticated call.
    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::SeqCst)
    }

    /// Waits until a dispatcher has made an authenticated call.
    pub async fn wait_answered(&self) {
        while !self.answered() {
            let notified = self.notify.notified();
            if self.answered() {
                return;
            }
            notified.await;
        }
    }

    /// Checks a call's `authorization` metadata.
    ///
    /// # Errors
    /// `Unauthenticated` when no token was issued or it does not match.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let expected = self.token.read().ok().and_then(|t| t.clone());
        let Some(expected) = expected else {
            return Err(Status::unauthenticated(
                "no token has been issued on this board's console yet",
            ));
        };
        let given = metadata
            .get(AUTH_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        if !same(given.as_bytes(), expected.as_bytes()) {
            return Err(Status::unauthenticated("wrong token"));
        }
        if !self.answered.swap(true, Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(AUTH_METADATA_KEY, v.parse().expect("ascii"));
        m
    }

    #[test]
    fn refuses_until_a_token_is_issued_then_only_that_token() {
        let a = Auth::default();
        assert_eq!(
            a.check(&meta("Bearer x")).expect_err("none").code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(a.set_token("secret".into()), TokenUse::Accepted);
        assert!(a.check(&MetadataMap::new()).is_err());
        assert!(a.check(&meta("Bearer secreT")).is_err());
        assert!(a.check(&meta("secret")).is_err());
        assert!(!a.answered());
        a.check(&meta("Bearer secret")).expect("ok");
        assert!(a.answered());
    }

    #[test]
    fn the_first_token_of_a_boot_stays() {
        let a = Auth::default();
        assert_eq!(a.set_token("first".into()), TokenUse::Accepted);
        a.check(&meta("Bearer first")).expect("in use");
        assert_eq!(a.set_token("first".into()), TokenUse::Repeated);
        assert_eq!(a.set_token("second".into()), TokenUse::Ignored);
        a.check(&meta("Bearer first")).expect("still the first");
        assert_eq!(
            a.check(&meta("Bearer second")).expect_err("later").code(),
            tonic::Code::Unauthenticated
        );
    }
}
