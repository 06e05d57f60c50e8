//! Locating the shared test data (never skipped silently).
use std::path::PathBuf;

pub fn shared_data() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    assert!(
        dir.join("fvc2002-iso").is_dir() && dir.join("iso-invalid").is_dir(),
        "shared test data not found at {} (expected fvc2002-iso/ and iso-invalid/ there; \
         the workspace must be checked out next to shared/)",
        dir.display()
    );
    dir
}
