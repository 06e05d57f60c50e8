//! `sqlx::migrate!` embeds the migration files at compile time; without this, adding a
//! migration would not rebuild the crate and a stale binary would miss the new tables.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
