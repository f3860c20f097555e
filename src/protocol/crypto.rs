//! Field encryption of protocol §9: `appInfo.userName`/`password` in answers and
//! V1 `mobilePhone`/`email` in requests.
//!
//! Format: `iv + base64(AES-CBC-PKCS5(plaintext))`, the IV being 16 random
//! alphanumeric ASCII characters. The AES key is what Java's
//! `KeyGenerator("AES")` yields when seeded through `SecureRandom("SHA1PRNG")`
//! with the access key: the first 16/32 bytes of SUN's SHA1PRNG stream.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha1::{Digest, Sha1};

/// `encryptType` of a newInstance answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncryptType {
    /// `"1"`: AES-256-CBC, the protocol's default.
    Aes256,
    /// `"2"`: AES-128-CBC.
    Aes128,
}

impl EncryptType {
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "1" => Some(Self::Aes256),
            "2" => Some(Self::Aes128),
            _ => None,
        }
    }
    pub fn code(self) -> &'static str {
        match self {
            Self::Aes256 => "1",
            Self::Aes128 => "2",
        }
    }
    fn key_len(self) -> usize {
        match self {
            Self::Aes256 => 32,
            Self::Aes128 => 16,
        }
    }
}

#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("encrypted value is shorter than its 16-character IV")]
    TooShort,
    #[error("encrypted value is not IV + Base64")]
    BadBase64,
    #[error("encrypted value does not decrypt with this access key (bad padding)")]
    BadPadding,
    #[error("decrypted value is not UTF-8")]
    NotUtf8,
}

const IV_LEN: usize = 16;

/// The first `len` bytes of SUN's SHA1PRNG seeded with `seed` (and nothing else).
fn sha1prng(seed: &[u8], len: usize) -> Vec<u8> {
    let mut state: [u8; 20] = Sha1::digest(seed).into();
    let mut out = Vec::with_capacity(len + 20);
    while out.len() < len {
        let block: [u8; 20] = Sha1::digest(state).into();
        out.extend_from_slice(&block);
        // state = state + block + 1, as a little-endian-by-position byte adder (SUN's updateState).
        let mut carry: i32 = 1;
        let mut changed = false;
        for i in 0..20 {
            let v = i32::from(state[i] as i8) + i32::from(block[i] as i8) + carry;
            let t = v as u8;
            changed |= state[i] != t;
            state[i] = t;
            carry = v >> 8;
        }
        if !changed {
            state[0] = state[0].wrapping_add(1);
        }
    }
    out.truncate(len);
    out
}

/// The AES key Java derives from the access key for this `encryptType`.
pub fn derive_key(access_key: &str, kind: EncryptType) -> Vec<u8> {
    sha1prng(access_key.as_bytes(), kind.key_len())
}

/// A 16-character alphanumeric IV, as KooGallery's own code makes.
pub fn random_iv() -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(IV_LEN).map(char::from).collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("AES needs a 16- or 32-byte key and a 16-byte IV")]
pub struct EncryptError;

/// Encrypts `plaintext` with an explicit IV (16 ASCII characters).
pub fn encrypt_with_iv(key: &[u8], iv: &str, plaintext: &str) -> Result<String, EncryptError> {
    if iv.len() != IV_LEN {
        return Err(EncryptError);
    }
    let ct = match key.len() {
        32 => cbc::Encryptor::<aes::Aes256>::new_from_slices(key, iv.as_bytes())
            .map(|c| c.encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes())),
        16 => cbc::Encryptor::<aes::Aes128>::new_from_slices(key, iv.as_bytes())
            .map(|c| c.encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes())),
        _ => return Err(EncryptError),
    };
    ct.map(|ct| format!("{iv}{}", BASE64.encode(ct))).map_err(|_| EncryptError)
}

/// Encrypts with a fresh random IV.
pub fn encrypt(key: &[u8], plaintext: &str) -> Result<String, EncryptError> {
    encrypt_with_iv(key, &random_iv(), plaintext)
}

/// Decrypts `iv + base64(ciphertext)`.
pub fn decrypt(key: &[u8], value: &str) -> Result<String, DecryptError> {
    if value.len() < IV_LEN || !value.is_char_boundary(IV_LEN) {
        return Err(DecryptError::TooShort);
    }
    let (iv, b64) = value.split_at(IV_LEN);
    let ct = BASE64.decode(b64).map_err(|_| DecryptError::BadBase64)?;
    let pt = match key.len() {
        32 => cbc::Decryptor::<aes::Aes256>::new_from_slices(key, iv.as_bytes())
            .map_err(|_| DecryptError::TooShort)?
            .decrypt_padded_vec_mut::<Pkcs7>(&ct),
        _ => cbc::Decryptor::<aes::Aes128>::new_from_slices(key, iv.as_bytes())
            .map_err(|_| DecryptError::TooShort)?
            .decrypt_padded_vec_mut::<Pkcs7>(&ct),
    }
    .map_err(|_| DecryptError::BadPadding)?;
    String::from_utf8(pt).map_err(|_| DecryptError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys produced by OpenJDK 17's KeyGenerator (protocol §9 table).
    #[test]
    fn key_derivation_matches_java_vectors() {
        let cases = [
            ("test-access-key-123", EncryptType::Aes128, "c9e3a8e3a2c2e5497d975cbdea2fbd5a"),
            (
                "test-access-key-123",
                EncryptType::Aes256,
                "c9e3a8e3a2c2e5497d975cbdea2fbd5aa15283155960dbd281c147b0e511caee",
            ),
            ("ebf72724-bacc-414b-a86b-fda5bcc8153c", EncryptType::Aes128, "9dae850c6750255efbf285046f83df9f"),
            (
                "ebf72724-bacc-414b-a86b-fda5bcc8153c",
                EncryptType::Aes256,
                "9dae850c6750255efbf285046f83df9fbb0733d6cada35a5c9a8918e5213371d",
            ),
            ("x", EncryptType::Aes256, "b69027d44f6e5edc07f1aead1477967b16f28227af4fff79ed0b192725fcde60"),
        ];
        for (ak, kind, want) in cases {
            assert_eq!(hex::encode(derive_key(ak, kind)), want, "{ak} {kind:?}");
        }
    }

    #[test]
    fn encryption_matches_java_vector_and_round_trips() {
        let key = derive_key("test-access-key-123", EncryptType::Aes256);
        let enc = encrypt_with_iv(&key, "abcdefgh12345678", "P@ssw0rd").unwrap();
        assert_eq!(enc, "abcdefgh12345678bmkqomiL6m/xwfltpSLVgQ==");
        assert_eq!(encrypt_with_iv(&key, "short", "x"), Err(EncryptError));
        assert_eq!(encrypt_with_iv(&key[..20], "abcdefgh12345678", "x"), Err(EncryptError));
        assert_eq!(decrypt(&key, &enc).as_deref(), Ok("P@ssw0rd"));

        let key128 = derive_key("test-access-key-123", EncryptType::Aes128);
        let enc = encrypt(&key128, "13800000000").unwrap();
        assert_eq!(enc.len(), 16 + 24);
        assert_eq!(decrypt(&key128, &enc).as_deref(), Ok("13800000000"));
    }

    #[test]
    fn bad_ciphertexts_are_refused_with_a_reason() {
        let key = derive_key("test-access-key-123", EncryptType::Aes256);
        assert_eq!(decrypt(&key, "short"), Err(DecryptError::TooShort));
        assert_eq!(decrypt(&key, "abcdefgh12345678!!notbase64"), Err(DecryptError::BadBase64));
        let other = derive_key("another-key", EncryptType::Aes256);
        let enc = encrypt_with_iv(&other, "abcdefgh12345678", "P@ssw0rd").unwrap();
        assert!(matches!(decrypt(&key, &enc), Err(DecryptError::BadPadding | DecryptError::NotUtf8)));
        assert_eq!(decrypt(&key, "abcdefgh1234567é"), Err(DecryptError::TooShort));
    }
}
