//! What a test does where the machine lacks something it needs (hugepages, say): under CI it
//! fails, saying what is missing, because a test that passes by skipping proves nothing; on a
//! developer's machine it says SKIPPED loudly and lets the test return.

/// True when running under CI (`CI` set to anything but empty, `0` or `false`).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Reports that `test` cannot run here because the machine lacks `what`: panics under CI, prints a
/// loud SKIPPED line elsewhere (the caller then returns).
pub fn machine_lacks(test: &str, what: &str) {
    if under_ci() {
        panic!("{test}: this machine lacks {what}; under CI a test must not skip");
    }
    eprintln!("\n******** SKIPPED {test}: this machine lacks {what} ********\n");
}
