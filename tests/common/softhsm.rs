//! SoftHSM2 tokens for the PKCS#11 tests: one token directory per test binary (SoftHSM reads
//! `SOFTHSM2_CONF` once), fresh tokens made with an SO login. No silent skip: a machine
//! without SoftHSM fails and says what to install.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SO_PIN: &str = "so-pin-0000";

/// The SoftHSM library, with a token directory of this test process.
pub fn module() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        assert!(
            Path::new(SOFTHSM).exists(),
            "{SOFTHSM} missing: install Debian's softhsm2 (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        // Before the library is initialised (below, once), while no other thread reads it.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        dir
    });
    PathBuf::from(SOFTHSM)
}

/// A fresh token labelled `label` with the user PIN `user_pin`; returns its slot.
pub fn new_token(label: &str, user_pin: &str) -> Slot {
    static CREATING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = edge_est::keys::pkcs11::module(&module()).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let free = loop {
        // A slot another test is initialising can fail GetTokenInfo (or the slot list) for a
        // moment: not free, ask again.
        let free = ctx
            .get_all_slots()
            .unwrap_or_default()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()));
        match free {
            Some(slot) => break slot,
            None if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            None => panic!("SoftHSM offers no free slot"),
        }
    };
    ctx.init_token(free, &AuthPin::from(SO_PIN), label).unwrap();
    let slot = slot_of(label);
    let session = ctx.open_rw_session(slot).unwrap();
    session
        .login(UserType::So, Some(&AuthPin::from(SO_PIN)))
        .unwrap();
    session.init_pin(&AuthPin::from(user_pin)).unwrap();
    session.logout().unwrap();
    slot
}

/// The slot of the token labelled `label`.
/// SoftHSM answers GetTokenInfo (and at times the slot list) with GeneralError while another
/// test is initialising a token: it is asked again, for at most 5 s.
pub fn slot_of(label: &str) -> Slot {
    let ctx = edge_est::keys::pkcs11::module(&module()).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // The slot list itself can fail the same way while another process initialises.
        let found = ctx
            .get_slots_with_initialized_token()
            .unwrap_or_default()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label() == label));
        match found {
            Some(slot) => return slot,
            None if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            None => panic!("no SoftHSM token labelled {label}"),
        }
    }
}
