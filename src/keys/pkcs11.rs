//! Private keys that live in a PKCS#11 token (an HSM, a TPM through tpm2-pkcs11, SoftHSM),
//! through the `cryptoki` binding. The key never leaves the token: edge-est holds a handle and
//! asks the token to sign.
//!
//! One context per module library for the whole process (a library is initialised once; a
//! configuration reload reuses it), one [`Token`] per (library, slot) with its PIN and a pool
//! of sessions, so that concurrent signatures do not wait on one session. A session that the
//! token no longer knows (token reset, removed and reinserted) is dropped and a fresh one
//! opened; a token that forgot the login (`CKR_USER_NOT_LOGGED_IN`) is logged in again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use secrecy::{ExposeSecret, SecretString};

use super::uri::{PinSource, Pkcs11Uri};
use super::KeyError;

/// Idle sessions kept per token; more may be open while signatures are under way.
const MAX_IDLE_SESSIONS: usize = 32;

/// The process-wide context of a PKCS#11 library, loaded and initialised on first use.
pub fn module(path: &Path) -> Result<Pkcs11, KeyError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(found) = modules.get(path) {
        return Ok(found.clone());
    }
    let module_error = |reason: String| KeyError::Module {
        module: path.display().to_string(),
        reason,
    };
    if !path.is_absolute() {
        // A bare name would be looked up on the loader's search path: say which file instead.
        return Err(module_error("give the library's absolute path".into()));
    }
    let ctx = Pkcs11::new(path).map_err(|e| module_error(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(module_error(format!("C_Initialize: {e}"))),
    }
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// One token (a slot of a module), logged in as the user, with a pool of sessions.
pub struct Token {
    ctx: Pkcs11,
    slot: Slot,
    pin: Option<SecretString>,
    idle: Mutex<Vec<Session>>,
}

/// The tokens in use, by library and slot: PKCS#11 login state is per application and token,
/// so keys on one token share its sessions.
type Tokens = Mutex<HashMap<(PathBuf, u64), Arc<Token>>>;

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(Default::default)
}

fn read_pin(uri: &Pkcs11Uri) -> Result<Option<SecretString>, KeyError> {
    Ok(match &uri.pin {
        None => None,
        Some(PinSource::Value(pin)) => Some(pin.clone()),
        Some(PinSource::File(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| KeyError::Token {
                uri: uri.shown.clone(),
                reason: format!("pin-source {}: {e}", path.display()),
            })?;
            let pin = text.lines().next().unwrap_or("").to_owned();
            Some(SecretString::from(pin))
        }
    })
}

fn token_matches(ctx: &Pkcs11, slot: Slot, uri: &Pkcs11Uri) -> Result<bool, CkError> {
    let info = ctx.get_token_info(slot)?;
    let eq = |want: &Option<String>, have: &str| {
        want.as_deref()
            .is_none_or(|w| w.trim_end() == have.trim_end())
    };
    Ok(eq(&uri.token, info.label())
        && eq(&uri.serial, info.serial_number())
        && eq(&uri.manufacturer, info.manufacturer_id())
        && eq(&uri.model, info.model()))
}

impl Token {
    /// Finds the token `uri` names in `module` and logs in with the URI's PIN.
    pub fn open(module_path: &Path, uri: &Pkcs11Uri) -> Result<Arc<Token>, KeyError> {
        let ctx = module(module_path)?;
        let failed = |what: &str, e: CkError| KeyError::Token {
            uri: uri.shown.clone(),
            reason: format!("{what}: {e}"),
        };
        let candidates = ctx
            .get_slots_with_initialized_token()
            .map_err(|e| failed("listing slots", e))?;
        let mut found = Vec::new();
        for slot in candidates {
            if uri.slot_id.is_some_and(|id| id != slot.id()) {
                continue;
            }
            if token_matches(&ctx, slot, uri).map_err(|e| failed("reading token info", e))? {
                found.push(slot);
            }
        }
        let slot = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(KeyError::TokenNotFound {
                    uri: uri.shown.clone(),
                })
            }
            _ => {
                return Err(KeyError::Token {
                    uri: uri.shown.clone(),
                    reason: format!(
                        "{} tokens match; name one with token=, serial= or slot-id=",
                        found.len()
                    ),
                })
            }
        };
        let pin = read_pin(uri)?;
        let key = (module_path.to_owned(), slot.id());
        let mut tokens = tokens().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = tokens.get(&key) {
            let same_pin = match (&token.pin, &pin) {
                (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
                (None, None) => true,
                _ => false,
            };
            if same_pin {
                return Ok(token.clone());
            }
        }
        let token = Arc::new(Token {
            ctx,
            slot,
            pin,
            idle: Mutex::new(Vec::new()),
        });
        // Prove the PIN now, at configuration load, on a session of our own: a token already
        // logged in (by another key of this process) accepts any login, so log out first.
        let session = token
            .ctx
            .open_ro_session(slot)
            .map_err(|e| failed("opening a session", e))?;
        let _ = session.logout();
        match token.login(&session) {
            Ok(()) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                // Whoever was logged in before (a key with the right PIN) logs in again.
                if let Some(previous) = tokens.get(&key) {
                    let _ = previous.login(&session);
                }
                return Err(KeyError::WrongPin {
                    uri: uri.shown.clone(),
                });
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(KeyError::Token {
                    uri: uri.shown.clone(),
                    reason: "the user PIN is locked".into(),
                })
            }
            Err(e) => return Err(failed("logging in", e)),
        }
        token.put_back(session);
        tokens.insert(key, token.clone());
        Ok(token)
    }

    fn login(&self, session: &Session) -> Result<(), CkError> {
        let Some(pin) = &self.pin else {
            return Ok(());
        };
        let pin = AuthPin::from(pin.expose_secret());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn take(&self) -> Result<Session, CkError> {
        if let Some(session) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(session);
        }
        let session = self.ctx.open_ro_session(self.slot)?;
        self.login(&session)?;
        Ok(session)
    }

    fn put_back(&self, session: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(session);
        }
    }

    /// Runs `op` on a pooled session, once more after logging in again or on a fresh session
    /// when the token lost the login or the session.
    pub fn with_session<T>(
        &self,
        op: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        let mut retried = false;
        loop {
            let session = self.take()?;
            match op(&session) {
                Ok(value) => {
                    self.put_back(session);
                    return Ok(value);
                }
                Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) if !retried => {
                    retried = true;
                    tracing::warn!("PKCS#11 token lost its login; logging in again");
                    self.login(&session)?;
                    self.put_back(session);
                }
                Err(CkError::Pkcs11(
                    RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent,
                    _,
                )) if !retried => {
                    retried = true;
                    tracing::warn!("PKCS#11 session lost (token reset?); opening fresh sessions");
                    // The other idle sessions went with it.
                    self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    drop(session);
                }
                Err(e) => {
                    self.put_back(session);
                    return Err(e);
                }
            }
        }
    }

    /// Sessions open and idle in the pool.
    pub fn idle_sessions(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Logs the application out of the token (every session): what a token reset does to the
    /// login. For tests of the re-login path.
    pub fn logout_for_test(&self) -> Result<(), CkError> {
        self.with_session(|s| s.logout())
    }
}

/// What kind of key a token holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKeyKind {
    EcP256,
    EcP384,
    Rsa { bits: usize },
}

/// DER of the named curves' OIDs, as CKA_EC_PARAMS holds them.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// A private key object on a token.
pub struct TokenObject {
    pub token: Arc<Token>,
    template: Vec<Attribute>,
    handle: Mutex<ObjectHandle>,
    pub kind: TokenKeyKind,
    pub shown: String,
}

impl TokenObject {
    pub fn find(module_path: &Path, uri: &Pkcs11Uri) -> Result<TokenObject, KeyError> {
        let token = Token::open(module_path, uri)?;
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(label) = &uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let failed = |e: CkError| KeyError::Token {
            uri: uri.shown.clone(),
            reason: e.to_string(),
        };
        let handles = token
            .with_session(|s| s.find_objects(&template))
            .map_err(failed)?;
        let handle = match handles.as_slice() {
            [one] => *one,
            [] => {
                return Err(KeyError::ObjectMissing {
                    uri: uri.shown.clone(),
                })
            }
            more => {
                return Err(KeyError::Token {
                    uri: uri.shown.clone(),
                    reason: format!("{} private keys match; name one with id=", more.len()),
                })
            }
        };
        let attributes = token
            .with_session(|s| {
                s.get_attributes(
                    handle,
                    &[
                        AttributeType::KeyType,
                        AttributeType::EcParams,
                        AttributeType::Modulus,
                        AttributeType::Sign,
                    ],
                )
            })
            .map_err(failed)?;
        let mut key_type = None;
        let mut ec_params = None;
        let mut modulus_len = None;
        let mut can_sign = true;
        for attribute in attributes {
            match attribute {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(p) => ec_params = Some(p),
                Attribute::Modulus(m) => {
                    modulus_len = Some(m.iter().skip_while(|b| **b == 0).count() * 8)
                }
                Attribute::Sign(s) => can_sign = s,
                _ => {}
            }
        }
        let unsupported = |what: String| KeyError::Unsupported {
            uri: uri.shown.clone(),
            what,
        };
        if !can_sign {
            return Err(unsupported("the key may not sign (CKA_SIGN false)".into()));
        }
        let kind = match key_type {
            Some(t) if t == KeyType::EC => match ec_params.as_deref() {
                Some(P256_PARAMS) => TokenKeyKind::EcP256,
                Some(P384_PARAMS) => TokenKeyKind::EcP384,
                _ => {
                    return Err(unsupported(
                        "an EC key on a curve other than P-256 and P-384".into(),
                    ))
                }
            },
            Some(t) if t == KeyType::RSA => match modulus_len {
                Some(bits) if bits >= 2048 => TokenKeyKind::Rsa { bits },
                Some(bits) => {
                    return Err(unsupported(format!(
                        "an RSA key of {bits} bits (at least 2048)"
                    )))
                }
                None => return Err(unsupported("an RSA key without its modulus".into())),
            },
            Some(t) => return Err(unsupported(format!("a key of type {t}"))),
            None => return Err(unsupported("a key of unknown type".into())),
        };
        Ok(TokenObject {
            token,
            template,
            handle: Mutex::new(handle),
            kind,
            shown: uri.shown.clone(),
        })
    }

    /// Signs with `mechanism`; finds the object again if the token forgot its handle.
    pub fn sign(&self, mechanism: &Mechanism, data: &[u8]) -> Result<Vec<u8>, CkError> {
        let handle = *self.handle.lock().unwrap_or_else(|e| e.into_inner());
        match self.token.with_session(|s| s.sign(mechanism, handle, data)) {
            Err(
                e @ CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _),
            ) => {
                // A token that forgot the login hides its private objects: their handles are
                // invalid rather than "not logged in". Log in again, find the key again.
                self.token.with_session(|s| self.token.login(s))?;
                let found = self
                    .token
                    .with_session(|s| s.find_objects(&self.template))?;
                let [handle] = found.as_slice() else {
                    return Err(e);
                };
                *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = *handle;
                self.token
                    .with_session(|s| s.sign(mechanism, *handle, data))
            }
            other => other,
        }
    }

    /// The key's protection attributes, as the token reports them: (CKA_SENSITIVE,
    /// CKA_EXTRACTABLE).
    pub fn protection(&self) -> Result<(Option<bool>, Option<bool>), CkError> {
        let handle = *self.handle.lock().unwrap_or_else(|e| e.into_inner());
        let attributes = self.token.with_session(|s| {
            s.get_attributes(
                handle,
                &[AttributeType::Sensitive, AttributeType::Extractable],
            )
        })?;
        let mut out = (None, None);
        for attribute in attributes {
            match attribute {
                Attribute::Sensitive(v) => out.0 = Some(v),
                Attribute::Extractable(v) => out.1 = Some(v),
                _ => {}
            }
        }
        Ok(out)
    }
}

impl Token {
    /// Runs `op` on a fresh read-write session (object creation and destruction need one),
    /// logged in as the user.
    fn with_rw_session<T>(
        &self,
        op: impl FnOnce(&Session) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        let session = self.ctx.open_rw_session(self.slot)?;
        self.login(&session)?;
        op(&session)
    }
}

/// Generates an EC P-256 key pair inside the token `uri` names, labelled `label` with CKA_ID
/// `id`: the private key is a token object, private, sensitive, never extractable, allowed to
/// sign. Returns the public point (uncompressed, 65 bytes).
pub fn generate_ec_p256(
    module_path: &Path,
    uri: &Pkcs11Uri,
    label: &str,
    id: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let token = Token::open(module_path, uri)?;
    let failed = |e: CkError| KeyError::Token {
        uri: uri.shown.clone(),
        reason: format!("generating a key pair: {e}"),
    };
    let public_template = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    let private_template = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    let point = token
        .with_rw_session(|s| {
            let (public, _private) = s.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )?;
            s.get_attributes(public, &[AttributeType::EcPoint])
        })
        .map_err(failed)?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .unwrap_or_default();
    // CKA_EC_POINT is a DER OCTET STRING around the point (some tokens give the bare point).
    let point = match point.as_slice() {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
        bare => bare.to_vec(),
    };
    if point.len() != 65 || point[0] != 0x04 {
        return Err(KeyError::Token {
            uri: uri.shown.clone(),
            reason: "the generated key's public point is malformed".into(),
        });
    }
    Ok(point)
}

/// Destroys the key objects (private and public) on the token `uri` names whose CKA_LABEL
/// starts with `prefix` and is none of `keep`. Returns the labels destroyed.
pub fn destroy_keys(
    module_path: &Path,
    uri: &Pkcs11Uri,
    prefix: &str,
    keep: &[&str],
) -> Result<Vec<String>, KeyError> {
    let token = Token::open(module_path, uri)?;
    let failed = |e: CkError| KeyError::Token {
        uri: uri.shown.clone(),
        reason: format!("removing orphan keys: {e}"),
    };
    token
        .with_rw_session(|s| {
            let mut destroyed = Vec::new();
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                for handle in s.find_objects(&[Attribute::Class(class)])? {
                    let label = s
                        .get_attributes(handle, &[AttributeType::Label])?
                        .into_iter()
                        .find_map(|a| match a {
                            Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    if label.starts_with(prefix) && !keep.contains(&label.as_str()) {
                        s.destroy_object(handle)?;
                        destroyed.push(label);
                    }
                }
            }
            Ok(destroyed)
        })
        .map_err(failed)
}
