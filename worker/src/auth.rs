//! Authentication of the gang's connections: challenge-response over the job token, so that
//! nothing a listener on the network captures lets it join, replay a request or derive the key of
//! another attempt.
//!
//! The job token (a Secret of the job, or made up by `local` mode) never travels. From it each
//! attempt derives its own keys with HKDF-SHA256 (RFC 5869), one for the rendezvous and one for
//! the data connections. A party proves that it holds the key by an HMAC-SHA256 over a fresh
//! nonce of the other side (and, on data connections, its own nonce too, so that both sides prove
//! it), compared in constant time. A recorded proof is worthless: the next challenge has another
//! nonce. What is not covered: an attacker on the path who can rewrite packets may take over a
//! connection after its handshake (the traffic is not encrypted); the operator's NetworkPolicy and
//! the cluster network are the defence there (see the README's threat model).

use ring::{hkdf, hmac, rand as ring_rand};

/// Length of a nonce, in bytes.
pub const NONCE_LEN: usize = 32;
/// Length of a proof (an HMAC-SHA256 tag), in bytes.
pub const PROOF_LEN: usize = 32;

/// The keys of one attempt of one job.
#[derive(Clone, Debug)]
pub struct GangKeys {
    rendezvous: hmac::Key,
    data: hmac::Key,
}

fn derive(prk: &hkdf::Prk, purpose: &[u8], attempt: u32) -> hmac::Key {
    let attempt = attempt.to_be_bytes();
    let info = [purpose, &attempt[..]];
    let okm = prk
        .expand(&info, hmac::HMAC_SHA256)
        .expect("32 bytes is within HKDF-SHA256's output limit");
    hmac::Key::from(okm)
}

impl GangKeys {
    /// The keys of `attempt` of the job whose token is `token`.
    pub fn derive(token: &str, attempt: u32) -> Self {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"lockstep.dev/v1alpha1 gang keys");
        let prk = salt.extract(token.as_bytes());
        Self {
            rendezvous: derive(&prk, b"rendezvous", attempt),
            data: derive(&prk, b"data", attempt),
        }
    }

    /// The proof of a rendezvous request: `method` by `rank` of `attempt`, answering `nonce`.
    pub fn rendezvous_proof(&self, method: &str, rank: u32, attempt: u32, nonce: &[u8]) -> Vec<u8> {
        hmac::sign(
            &self.rendezvous,
            &rendezvous_message(method, rank, attempt, nonce),
        )
        .as_ref()
        .to_vec()
    }

    /// Whether `proof` proves a rendezvous request (constant time).
    pub fn check_rendezvous(
        &self,
        method: &str,
        rank: u32,
        attempt: u32,
        nonce: &[u8],
        proof: &[u8],
    ) -> bool {
        hmac::verify(
            &self.rendezvous,
            &rendezvous_message(method, rank, attempt, nonce),
            proof,
        )
        .is_ok()
    }

    /// The proof of one side of a data connection's handshake: `side` (`b"dialer"` or
    /// `b"listener"`) over both nonces and the connection's `field` (rank and channel).
    pub fn data_proof(&self, side: &[u8], field: u32, dialer: &[u8], listener: &[u8]) -> Vec<u8> {
        hmac::sign(&self.data, &data_message(side, field, dialer, listener))
            .as_ref()
            .to_vec()
    }

    /// Whether `proof` is the proof of `side` (constant time).
    pub fn check_data(
        &self,
        side: &[u8],
        field: u32,
        dialer: &[u8],
        listener: &[u8],
        proof: &[u8],
    ) -> bool {
        hmac::verify(
            &self.data,
            &data_message(side, field, dialer, listener),
            proof,
        )
        .is_ok()
    }
}

fn rendezvous_message(method: &str, rank: u32, attempt: u32, nonce: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + method.len() + nonce.len());
    m.extend_from_slice(b"lockstep rendezvous\0");
    m.extend_from_slice(method.as_bytes());
    m.push(0);
    m.extend_from_slice(&rank.to_be_bytes());
    m.extend_from_slice(&attempt.to_be_bytes());
    m.extend_from_slice(nonce);
    m
}

fn data_message(side: &[u8], field: u32, dialer: &[u8], listener: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + side.len() + dialer.len() + listener.len());
    m.extend_from_slice(b"lockstep data\0");
    m.extend_from_slice(side);
    m.push(0);
    m.extend_from_slice(&field.to_be_bytes());
    m.extend_from_slice(dialer);
    m.extend_from_slice(listener);
    m
}

/// A fresh random nonce from the operating system's generator.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    ring_rand::SecureRandom::fill(&ring_rand::SystemRandom::new(), &mut n)
        .expect("the system random generator works");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_hold_for_their_own_key_nonce_and_request_only() {
        let k = GangKeys::derive("token-a", 3);
        let n = nonce();
        let p = k.rendezvous_proof("join", 2, 3, &n);
        assert_eq!(p.len(), PROOF_LEN);
        assert!(k.check_rendezvous("join", 2, 3, &n, &p));
        // Another nonce (a replay), method, rank, attempt, token or a flipped bit: refused.
        assert!(!k.check_rendezvous("join", 2, 3, &nonce(), &p));
        assert!(!k.check_rendezvous("abort", 2, 3, &n, &p));
        assert!(!k.check_rendezvous("join", 1, 3, &n, &p));
        let mut bad = p.clone();
        bad[0] ^= 1;
        assert!(!k.check_rendezvous("join", 2, 3, &n, &bad));
        assert!(!GangKeys::derive("token-a", 4).check_rendezvous("join", 2, 3, &n, &p));
        assert!(!GangKeys::derive("token-b", 3).check_rendezvous("join", 2, 3, &n, &p));
        // The data key is not the rendezvous key.
        let (d, l) = (nonce(), nonce());
        let q = k.data_proof(b"dialer", 2, &d, &l);
        assert!(k.check_data(b"dialer", 2, &d, &l, &q));
        assert!(!k.check_data(b"listener", 2, &d, &l, &q));
        assert!(!k.check_data(b"dialer", 2, &d, &nonce(), &q));
        assert_ne!(q, k.rendezvous_proof("join", 2, 3, &d));
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
    }
}
