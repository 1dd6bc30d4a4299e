//! Standard Webhooks signing: a secret is `whsec_` followed by the base64 of its key; a message
//! is signed as `v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>`, one
//! signature per secret, space separated, so receivers keep verifying during a rotation.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The prefix of a secret's text.
pub const PREFIX: &str = "whsec_";
/// The key sizes accepted (Standard Webhooks asks for 24 to 64 bytes).
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;
/// The size of the keys aiq generates.
const NEW_KEY_BYTES: usize = 32;

/// A signing key, parsed from its `whsec_` text. Never printed.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(***)")
    }
}

impl Key {
    /// Parses `whsec_<base64>`; the refusal says what is wrong without quoting the secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("a webhook secret starts with {PREFIX}"))?;
        let bytes = STANDARD
            .decode(b64)
            .map_err(|_| format!("a webhook secret is {PREFIX} followed by base64"))?;
        if !KEY_BYTES.contains(&bytes.len()) {
            return Err(format!(
                "a webhook secret's key is {}-{} bytes, not {}",
                KEY_BYTES.start(),
                KEY_BYTES.end(),
                bytes.len()
            ));
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
    }

    /// The `v1,<base64>` signature of a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body.as_bytes());
        format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
    }
}

/// A new secret's text, from the system's random source.
pub fn generate() -> Result<String, String> {
    let mut bytes = [0u8; NEW_KEY_BYTES];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "the system's random source failed")?;
    Ok(format!("{PREFIX}{}", STANDARD.encode(bytes)))
}

/// The `webhook-signature` header: one signature per key, newest first.
pub fn signature_header(keys: &[Key], id: &str, timestamp: i64, body: &str) -> String {
    let sigs: Vec<String> = keys.iter().map(|k| k.sign(id, timestamp, body)).collect();
    sigs.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The example of the Standard Webhooks specification's test vectors: this secret, id,
    /// timestamp and body sign to this value.
    #[test]
    fn the_specifications_example_signs_to_its_published_signature() {
        let key = Key::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_generated_secret_parses_and_two_keys_give_two_signatures() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        let keys = [Key::parse(&a).unwrap(), Key::parse(&b).unwrap()];
        let header = signature_header(&keys, "msg_1", 5, "{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn malformed_secrets_are_refused_without_quoting_them() {
        for bad in [
            "",
            "whsec_",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!notbase64",
            "whsec_c2hvcnQ=",
        ] {
            let e = Key::parse(bad).unwrap_err();
            assert!(bad.len() < 8 || !e.contains(bad), "{e}");
        }
    }

    proptest! {
        #[test]
        fn any_text_either_parses_as_a_secret_or_is_refused(s in ".{0,100}") {
            let _ = Key::parse(&s);
            let _ = Key::parse(&format!("whsec_{s}"));
        }
    }
}
